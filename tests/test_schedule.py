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


class FakeClock:
    """Time that moves only when the trainer works: a step takes `step_s`, an eval + checkpoint `eval_s`, one
    eval batch alone (the trainer's guess at an eval's time) `eval_batch_s`."""

    def __init__(self, monkeypatch, step_s: float, eval_s: float, eval_batch_s: float = 0.0):
        from toolkit.train import loop

        self.t = 0.0
        real_step, real_validate = loop.train_step, loop.validate

        def step(*a, **k):
            self.t += step_s
            return real_step(*a, **k)

        def validate(s, max_batches=0):
            self.t += eval_batch_s if max_batches == 1 else eval_s
            return real_validate(s, max_batches)

        monkeypatch.setattr(loop, "clock", lambda: self.t)
        monkeypatch.setattr(loop, "train_step", step)
        monkeypatch.setattr(loop, "validate", validate)


def test_a_time_budget_ends_at_the_budget_with_a_final_eval_and_the_lr_at_its_floor(tiny_recipe, tmp_path,
                                                                                     monkeypatch):
    import json

    from safetensors.torch import load_file

    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib
    from toolkit.train.loop import train

    sets = ["train.max_minutes=1", "train.max_iters=5", "train.eval_interval=10", "train.warmup_iters=2",
            "train.min_lr=1e-4", "train.log_interval=1", "train.plot=false"]
    FakeClock(monkeypatch, step_s=2.0, eval_s=5.0)
    summary = train(recipe_lib.load(tiny_recipe, sets), tmp_path / "a")
    # 2 s steps, 5 s evals at steps 10 and 20: step 22 ends at 54 s (44 + 2 evals); one more step and the final
    # eval (2 + 5 s) would pass 60 s, so the final eval runs after step 22 and ends at 59 s. max_iters (5) does not
    # apply to a budgeted run.
    assert summary["step"] == 22 and not summary["stopped_early"]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 22]  # the final eval is inside the budget
    state = run_lib.load_state(tmp_path / "a" / "state.pt")
    assert state["step"] == 22 and state["wall_s"] == pytest.approx(59.0)
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[2] == pytest.approx(3e-3)  # the first step after warm-up runs at the peak: no jump down
    assert lrs[-1] < 0.05 * lrs[2] and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # cosine on the budget

    # stopped and resumed, the budget and the schedule carry on: the same steps, the same weights
    train(recipe_lib.load(tiny_recipe, sets), tmp_path / "b", stop_after=7)
    assert train(recipe_lib.load(tmp_path / "b" / "recipe.toml"), tmp_path / "b", resume=True)["step"] == 22
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_a_time_budget_keeps_room_for_a_final_eval_that_is_its_first(tiny_recipe, tmp_path, monkeypatch):
    """No eval before the budget's end (eval_interval past its steps): the trainer times one eval batch after the
    first step and keeps eval_iters times that for the final eval, which then ends inside the budget."""
    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib
    from toolkit.train.loop import train

    sets = ["train.max_minutes=1", "train.eval_interval=1000", "train.eval_iters=2", "train.plot=false"]
    FakeClock(monkeypatch, step_s=2.0, eval_s=6.0, eval_batch_s=3.0)
    summary = train(recipe_lib.load(tiny_recipe, sets), tmp_path / "a")
    # step 1 ends at 2 s, the timed batch at 5 s; step k ends at 2k + 3 s. The last step is the one after which
    # another step and the final eval (2 + 2 x 3 s) would pass 60 s: step 25 at 53 s, and the eval ends at 59 s
    # (without the guess: step 30 at 60 s, and the eval ends at 66 s)
    assert summary["step"] == 25
    assert run_lib.load_state(tmp_path / "a" / "state.pt")["wall_s"] == pytest.approx(59.0)


def test_a_token_budget_ends_at_the_last_step_that_fits(tiny_recipe, tmp_path):
    from toolkit import recipe as recipe_lib
    from toolkit.train.loop import train

    per_step = 4 * 2 * 32  # batch x grad_accum x seq of the tiny recipe
    r = recipe_lib.load(tiny_recipe, [f"train.max_tokens={per_step * 7 + 100}", "train.eval_interval=100",
                                      "train.plot=false"])
    assert train(r, tmp_path / "t")["step"] == 7


def test_a_run_that_reads_its_training_split_more_than_4_times_says_so(tiny_recipe, tmp_path, monkeypatch, capsys):
    from toolkit import recipe as recipe_lib
    from toolkit.shards.format import ShardSet
    from toolkit.shards.prepare import prepare
    from toolkit.train.loop import train

    small = ["data.synthetic_stories=4", "train.eval_interval=1000", "train.plot=false"]
    train_tokens = ShardSet(prepare(recipe_lib.load(tiny_recipe, small)).shards).tokens("train")
    per_step = 4 * 2 * 32
    steps = -(-5 * train_tokens // per_step)  # a little over 5 passes
    train(recipe_lib.load(tiny_recipe, small + [f"train.max_iters={steps}"]), tmp_path / "iters")
    out = capsys.readouterr().err
    passes = steps * per_step / train_tokens
    assert f"this run will read its training split {passes:.1f} times ({train_tokens:,} tokens)" in out
    assert out.count("training split") == 1  # said once, ahead

    # a time budget: said once, at the first log after the 4th pass
    FakeClock(monkeypatch, step_s=1.0, eval_s=0.0)
    minutes = (steps * 1.0 + 0.5) / 60
    train(recipe_lib.load(tiny_recipe, small + [f"train.max_minutes={minutes}", "train.log_interval=1"]),
          tmp_path / "minutes")
    out = capsys.readouterr().err
    assert out.count("has now read its training split 4 times") == 1 and "will read" not in out

    # within 4 passes: nothing
    train(recipe_lib.load(tiny_recipe, small + [f"train.max_iters={max(1, 3 * train_tokens // per_step)}"]),
          tmp_path / "few")
    assert "training split" not in capsys.readouterr().err


def test_a_warmup_fraction_warms_up_over_that_part_of_the_budget_whatever_the_step_time(tiny_recipe, tmp_path,
                                                                                        monkeypatch):
    """warmup_fraction = 0.25 of a 1-minute budget: the first step (where a compile goes) primes the optimizer at
    lr 0, then the lr rises linearly over the first quarter of the rest, and cosine takes it to the floor at the
    budget's end. The same fraction at 2 s and at 1 s a step: warm-up is a share of the budget, not a step count."""
    import json

    from toolkit import recipe as recipe_lib
    from toolkit.train.loop import train

    sets = ["train.max_minutes=1", "train.warmup_iters=1000", "train.warmup_fraction=0.25", "train.eval_interval=1000",
            "train.min_lr=0", "train.log_interval=1", "train.plot=false"]
    peaks = []
    for step_s in (2.0, 1.0):
        FakeClock(monkeypatch, step_s=step_s, eval_s=0.0)
        out = tmp_path / f"s{step_s}"
        summary = train(recipe_lib.load(tiny_recipe, sets), out)
        lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
        steps = round(60 / step_s)
        assert summary["step"] == len(lrs) == steps  # the budget, used to the end
        assert lrs[0] == 0.0 and lrs[1] == 0.0  # the first step, then the schedule's start (0 % of it done)
        peak = max(lrs)
        assert peak == pytest.approx(3e-3, rel=0.05)  # warmup_iters = 1000 steps did not apply
        # the ramp: linear in the budget, one step's share of a quarter of the budget each step
        ramp = [lr for lr in lrs[1:] if lr < peak * 0.999][: lrs.index(peak) - 1]
        rise = [b - a for a, b in zip(ramp, ramp[1:])]
        assert all(r == pytest.approx(rise[0], rel=1e-6) for r in rise)
        assert rise[0] == pytest.approx(3e-3 * step_s / (60 - step_s) / 0.25, rel=1e-6)
        peaks.append(lrs.index(peak) / steps)
        assert lrs[-1] < 0.01 * peak and all(a >= b for a, b in zip(lrs[lrs.index(peak):], lrs[lrs.index(peak) + 1:]))
    assert peaks[0] == pytest.approx(0.25, abs=0.05) and peaks[1] == pytest.approx(0.25, abs=0.05)
