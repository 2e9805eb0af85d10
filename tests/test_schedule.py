import pytest

from toolkit.recipe import TrainConfig
from toolkit.train.optim import lr_factor


def lrs(**kw):
    cfg = TrainConfig(**kw)
    return [cfg.lr * lr_factor(s, cfg) for s in range(cfg.max_iters)]


def test_cosine_warmup_then_decay_to_min_lr():
    v = lrs(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert v[0] == pytest.approx(1 / 11) and v[9] == pytest.approx(10 / 11)
    assert v[10] == pytest.approx(1.0)
    assert v[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert v[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(v[10:], v[11:]))


def test_cosine_with_max_iters_not_above_warmup_does_not_crash():
    # InnerArianna's fine-tune crashed with ZeroDivisionError when max_iters == warmup_iters
    v = lrs(lr=1.0, warmup_iters=1000, max_iters=1000)
    assert len(v) == 1000 and 0 < v[-1] <= 1.0
    assert lrs(lr=1.0, warmup_iters=50, max_iters=10)[-1] == pytest.approx(10 / 51)


def test_constant_and_attack_sustain_release():
    assert lrs(lr=1.0, schedule="constant", warmup_iters=0, max_iters=5) == [1.0] * 5
    v = lrs(lr=1.0, schedule="asr", warmup_iters=4, decay_iters=10, max_iters=30)
    assert v[0] == pytest.approx(0.2) and v[4:20] == [1.0] * 16
    assert v[20] == pytest.approx(0.9) and v[29] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(v[20:], v[21:]))


def test_adam8bit_falls_back_to_fp32_adam_without_cuda():
    import torch

    from toolkit.train.optim import build_optimizers

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    opts = build_optimizers(model, TrainConfig(optimizer="adam8bit", groups={"embedding": {"optimizer": "sgd"}}), "cpu")
    kinds = sorted(type(o).__name__ for o in opts)
    assert kinds == ["Adam", "SGD"]
    with pytest.raises(Exception, match="groups.matrix.optimizer"):
        from toolkit.recipe import build_table

        build_table(TrainConfig, {"groups": {"matrix": {"optimizer": "lion"}}}, "t")
