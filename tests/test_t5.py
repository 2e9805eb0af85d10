"""T5 span denoising: span corruption invariants, the curriculum, the encoder-decoder model (no fully masked
attention row, cached-encoder generation equal to recomputing), the seed switches, and training through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import lmkit

from toolkit.generate import Sampling, generate
from toolkit.models import pgpt, t5
from toolkit.shards.span_corruption import (
    Curriculum,
    CurriculumConfig,
    SpanCorruption,
    SpecialIds,
    corrupt,
    objective_for,
    reconstruct,
    span_mask,
)

IDS = SpecialIds(pad=256, eos=257, bos=258, sentinel_start=259, n_sentinels=100)


def windows(B: int, T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(B, T))


# ---------------------------------------------------------------------------------------------------------
# span corruption


def test_mask_rate_reaches_the_target_and_overshoots_by_at_most_a_span():
    rng = np.random.default_rng(0)
    B, T = 64, 512
    mask = span_mask((B, T), 0.15, np.full(B, 3.0), rng)
    counts = mask.sum(1)
    assert (counts >= int(T * 0.15)).all()
    assert 0.15 <= counts.mean() / T < 0.165  # overshoot: part of one Poisson(3) span
    # spans are Poisson(3) runs: with 77 masked tokens per row there are many runs, not one block
    starts = mask & ~np.concatenate([np.zeros((B, 1), bool), mask[:, :-1]], 1)
    assert 12 < starts.sum(1).mean() < 30


def test_long_spans_follow_their_mean():
    rng = np.random.default_rng(1)
    mask = span_mask((256, 512), 0.15, np.full(256, 32.0), rng)
    starts = mask & ~np.concatenate([np.zeros((256, 1), bool), mask[:, :-1]], 1)
    mean_run = mask.sum() / starts.sum()
    assert 25 < mean_run < 45  # runs of Poisson(32), some merged or clipped at the end


def test_target_reconstructs_the_input_with_sentinels_in_order():
    x = windows(16, 200)
    mask = span_mask(x.shape, 0.15, np.full(16, 3.0), np.random.default_rng(2))
    c = corrupt(x, mask, IDS, max_target_len=200)
    assert reconstruct(c.inputs, c.targets, IDS) == x.tolist()
    for enc, tgt, m in zip(c.inputs, c.targets, c.mask):
        sent_enc = enc[(enc >= IDS.sentinel_start)]
        sent_tgt = tgt[(tgt >= IDS.sentinel_start)]
        k = len(sent_enc)
        assert k > 0 and sent_enc.tolist() == list(range(IDS.sentinel_start, IDS.sentinel_start + k))
        assert sent_tgt.tolist() == sent_enc.tolist()
        real = tgt[tgt >= 0]
        assert real[-1] == IDS.eos and (real == IDS.eos).sum() == 1
        assert len(real) == m.sum() + k + 1
        assert (enc != IDS.pad).sum() == len(enc) - m.sum() + k  # each run shrinks to one sentinel
        assert (tgt[len(real):] == -1).all()


def test_runs_beyond_the_sentinels_stay_visible_and_targets_fit():
    ids = SpecialIds(256, 257, 258, 259, n_sentinels=3)
    x = windows(8, 300, seed=3)
    mask = span_mask(x.shape, 0.3, np.full(8, 2.0), np.random.default_rng(3))
    c = corrupt(x, mask, ids, max_target_len=300)
    assert ((c.inputs >= 259) & (c.inputs < 262)).sum(1).max() == 3
    assert reconstruct(c.inputs, c.targets, ids) == x.tolist()
    c = corrupt(x, mask, IDS, max_target_len=40)  # a short decoder: the tail of the mask is given back
    assert c.targets.shape[1] <= 40
    assert reconstruct(c.inputs, c.targets, IDS) == x.tolist()


def test_objective_is_reproducible_per_step_and_micro_batch():
    obj = SpanCorruption(IDS, 128, seed=5, curriculum=Curriculum())
    x = windows(4, 128)
    a = obj.train_batch(x, step=7, micro=1)
    b = obj.train_batch(x, step=7, micro=1)
    c = obj.train_batch(x, step=7, micro=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    e1, e2 = obj.eval_batch(x, 0), SpanCorruption(IDS, 128, seed=99).eval_batch(x, 0)
    assert np.array_equal(e1[0], e2[0]) and np.array_equal(e1[1], e2[1])  # eval does not depend on the run's seed


# ---------------------------------------------------------------------------------------------------------
# curriculum


def test_curriculum_distribution_sums_to_one_and_tilts_toward_the_target_quantile():
    cur = Curriculum(CurriculumConfig(uniform_mix=0.0))
    cur.losses = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0])
    cur.quantile = 0.8
    probs, info = cur.distribution()
    assert probs.sum() == pytest.approx(1.0)
    base = (1 / cur.losses) / (1 / cur.losses).sum()
    assert base @ cur.losses < info["target"]  # 1/L weighting favours easy buckets...
    assert info["lambda"] < 0
    assert probs @ cur.losses == pytest.approx(info["target"], abs=1e-6)  # ...the tilt brings E[L] to the target
    assert info["target"] == pytest.approx(np.quantile(cur.losses, 0.8))
    # with the seed's 10 % uniform mix it still sums to 1 and every bucket keeps at least 1.25 %
    mixed, _ = Curriculum().distribution()
    assert mixed.sum() == pytest.approx(1.0) and (mixed >= 0.1 / 8 - 1e-12).all()


def test_curriculum_ema_and_quantile_schedule():
    cur = Curriculum(CurriculumConfig(check_every=10))
    cur.update(np.full(10, 3), np.full(10, 1.0))
    assert cur.losses[3] == pytest.approx(5.0 * 0.99**10 + (1 - 0.99**10) * 1.0)
    assert cur.losses[0] == 5.0
    assert cur.quantile == pytest.approx(0.26)  # the global EMA improved at the check: +0.01
    cur.update(np.full(10, 3), np.full(10, 50.0))
    assert cur.quantile == pytest.approx(0.26)  # it got worse: no change
    state = json.loads(json.dumps(cur.state()))
    other = Curriculum(CurriculumConfig(check_every=10))
    other.set_state(state)
    assert np.array_equal(other.probs, cur.distribution()[0])


# ---------------------------------------------------------------------------------------------------------
# the model


def tiny_config(**kw) -> t5.Config:
    base = dict(dim=16, n_layers=2, n_heads=2, head_dim=8, ff_mult=2, vocab_size=359, max_seq_len=48,
                max_target_len=32, pad_id=256, eos_id=257, bos_id=258, sentinel_start=259, n_sentinels=100)
    return t5.Config(**{**base, **kw})


def randomized(c: t5.Config, seed: int = 0) -> t5.Model:
    torch.manual_seed(seed)
    model = t5.Model(c)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # the head starts at zero, which would hide everything
    return model.eval()


def test_decoder_starts_from_bos_and_no_attention_row_is_fully_masked():
    c = tiny_config()
    model = randomized(c)
    x = windows(4, 48)
    obj = objective_for(model.config, 0)
    enc, tgt, _ = obj.train_batch(x, 0, 0)
    enc[0, 10:] = IDS.pad  # a heavily padded row
    dec = model.decoder_input(torch.from_numpy(tgt))
    assert (dec[:, 0] == c.bos_id).all() and (dec[:, 1:] == torch.from_numpy(tgt[:, :-1]).clamp(min=0)
                                                 .masked_fill(torch.from_numpy(tgt[:, :-1]) < 0, c.pad_id)).all()
    key_mask = torch.from_numpy(enc != IDS.pad)
    mask = pgpt.attention_mask(key_mask, 48, 48, causal=False, device="cpu")
    assert mask.any(-1).all()  # every query (padding ones too) sees at least one key
    with torch.no_grad():
        logits, loss = model(torch.from_numpy(enc), torch.from_numpy(tgt))
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    # the seed's decoder start (pad) is a switch; our causal decoder still gives its first query a key
    seed_model = randomized(tiny_config(decoder_start="pad"))
    assert (seed_model.decoder_input(torch.from_numpy(tgt))[:, 0] == c.pad_id).all()
    with torch.no_grad():
        assert torch.isfinite(seed_model(torch.from_numpy(enc), torch.from_numpy(tgt))[0]).all()


def test_padding_in_the_encoder_changes_nothing_for_the_real_tokens():
    model = randomized(tiny_config())
    enc = torch.from_numpy(windows(1, 20))
    padded = torch.cat([enc, torch.full((1, 8), IDS.pad)], dim=1)
    tgt = torch.tensor([[IDS.sentinel_start, 5, 6, IDS.eos]])
    with torch.no_grad():
        a, _ = model(enc, tgt)
        b, _ = model(padded, tgt)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_seed_labels_switch_drops_eos_and_sentinels_from_the_loss():
    x = windows(2, 48)
    ours, seed = randomized(tiny_config()), randomized(tiny_config(loss_on_special=False, z_loss=0.0))
    _, tgt, _ = objective_for(ours.config, 0).train_batch(x, 0, 0)
    t = torch.from_numpy(tgt)
    kept = seed.loss_targets(t)
    special = (t == IDS.eos) | (t >= IDS.sentinel_start)
    assert (kept[special] == -1).all() and (kept[~special] == t[~special]).all()
    assert (ours.loss_targets(t) == t).all()
    with torch.no_grad():
        logits, loss = seed(torch.from_numpy(x[:, :40]), t)
    rows = seed.row_losses(logits, t)
    assert loss.item() == pytest.approx(rows.mean().item(), rel=1e-5)  # sequence mean (seed), z-loss off


def _greedy_uncached(model: t5.Model, enc: torch.Tensor, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        memory, mmask = model.encode(enc)
        for _ in range(n):
            logits, _ = model.decode(torch.tensor([ids]), memory, mmask)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_encoder_generation_equals_recomputing_everything():
    model = randomized(tiny_config(), seed=3)
    enc = torch.from_numpy(windows(1, 30, seed=4))
    enc[0, 12] = IDS.sentinel_start
    prompt = [IDS.bos, IDS.sentinel_start]
    cond = model.condition(enc)
    cached = generate(cond, prompt, max_new_tokens=20, sampling=Sampling(temperature=0))
    assert len(cached) == 20
    assert cached == _greedy_uncached(model, enc, prompt, 20)
    # and the cached step's logits equal the full decoder's at every position
    cache = cond.new_cache(1)
    ids = torch.tensor([prompt + cached[:5]])
    with torch.no_grad():
        step_logits = [cond(ids[:, i : i + 1], cache=cache, pos=i)[0][0, -1] for i in range(ids.shape[1])]
        memory, mmask = model.encode(enc)
        full, _ = model.decode(ids, memory, mmask)
    torch.testing.assert_close(torch.stack(step_logits), full[0], atol=1e-5, rtol=1e-5)


def test_forward_without_targets_says_how_to_generate():
    model = randomized(tiny_config())
    with pytest.raises(ValueError, match="condition"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# through the trainer


TINY = """
name = "t5_test"
[model]
family = "t5"
dim = 32
n_layers = 1
n_heads = 2
head_dim = 16
ff_mult = 2
max_seq_len = 64
curriculum_check_every = 20
[tokenizer]
kind = "bytes"
n_sentinels = 50
[data]
source = "{source}"
[train]
device = "cpu"
dtype = "float32"
batch_size = 8
max_iters = 12
optimizer = "adam"
lr = 0.01
schedule = "constant"
warmup_iters = 0
eval_interval = 6
eval_iters = 2
log_interval = 3
"""


def test_t5_trains_logs_the_curriculum_and_resumes_exactly(tmp_path, capsys, one_thread):
    from conftest import make_text

    src = tmp_path / "docs"
    src.mkdir()
    for i in range(30):
        (src / f"d{i}.txt").write_text(make_text(30, seed=i))
    recipe = tmp_path / "t5.toml"
    recipe.write_text(TINY.format(source=src.as_posix()))

    full, part = tmp_path / "full", tmp_path / "part"
    code, _, err = lmkit(capsys, "train", str(recipe), "--set", f"train.out_dir={full}")
    assert code == 0, err
    assert "crclm" in err
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "crclm_dist" in r]
    assert logged and all(sum(r["crclm_dist"]) == pytest.approx(1.0, abs=1e-3) for r in logged)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] and vals[0] < np.log(359)
    saved = (full / "recipe.toml").read_text()
    assert "pad_id = 256" in saved and "sentinel_start = 259" in saved and "n_sentinels = 50" in saved

    code, _, err = lmkit(capsys, "train", str(recipe), "--set", f"train.out_dir={part}", "--stop-after", "5")
    assert code == 0, err
    state = torch.load(part / "state.pt", weights_only=True)
    assert state["sampler"]["objective"]["curriculum"]["updates"] == 5 * 8
    code, _, err = lmkit(capsys, "train", str(part), "--resume")
    assert code == 0, err
    final = {json.loads(line)["step"]: json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()}
    resumed = {json.loads(line)["step"]: json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()}
    assert resumed[12]["val_loss"] == pytest.approx(final[12]["val_loss"], rel=1e-5)

    code, out, err = lmkit(capsys, "eval", str(full), "--json", "--batches", "2")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(vals[-1], rel=1e-4)

    code, _, err = lmkit(capsys, "chat", str(full), "--prompt", "hello")
    assert code == 1 and "T5 span-denoising model, not a chat model" in err and "Traceback" not in err


def test_t5_refuses_a_tokenizer_without_sentinels(tmp_path, capsys):
    recipe = tmp_path / "t5.toml"
    recipe.write_text(TINY.format(source="synthetic").replace("n_sentinels = 50", "n_sentinels = 0")
                      .replace('source = "synthetic"', 'source = "synthetic"\nsynthetic_stories = 50'))
    code, _, err = lmkit(capsys, "train", str(recipe), "--set", f"train.out_dir={tmp_path / 'run'}")
    assert code == 1
    assert "t5 family needs a tokenizer with pad, eos, bos and sentinel ids" in err
    assert "Traceback" not in err



def test_the_loss_reaches_every_parameter_through_the_cross_attention():
    model = randomized(tiny_config()).train()
    enc, tgt, _ = objective_for(model.config, 0).train_batch(windows(4, 48), 0, 0)
    _, loss = model(torch.from_numpy(enc), torch.from_numpy(tgt))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # encoder blocks learn only through the decoder's cross-attention
