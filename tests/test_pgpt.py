"""PGPT-Lformer (toolkit.models.pgpt): the block against a hand-computed reference, rotary placement,
attention-II, masks, soft-cap and z-loss, optimizer groups, KV cache, generation and a tiny training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toolkit import recipe as recipe_lib
from toolkit.errors import UserError
from toolkit.models import pgpt
from toolkit.train.optim import build_optimizers

ROOT = Path(__file__).resolve().parent.parent


def tiny(**kw) -> pgpt.Config:
    base = dict(dim=16, n_layers=2, n_heads=2, head_dim=8, ff_mult=2, vocab_size=37, max_seq_len=12)
    return pgpt.Config(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (the head starts at zero and lam at 1, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() >= 2 else 0.3) + (1.0 if p.dim() == 0 else 0))
    return model


# ---------------------------------------------------------------------------------------------------------
# a reference written out with loops and explicit matrices


def ref_rms(x, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_rope(x, base):
    """x (T, dh): position t turns the pair (x[i], x[i + dh/2]) by t * base^(-2i/dh)."""
    T, dh = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(dh // 2):
            a = t * base ** (-2 * i / dh)
            x1, x2 = x[t, i], x[t, i + dh // 2]
            out[t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[t, i + dh // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def ref_block(block: pgpt.Block, c: pgpt.Config, x: torch.Tensor) -> torch.Tensor:
    """x (T, dim), one sequence, causal, per-head RMS QK-norm, attention-II on."""
    T, D, H, dh = x.shape[0], c.dim, c.n_heads, c.head_dim
    n = ref_rms(x)
    W = block.attn.qkv.weight
    Wq, Wk, Wv, Wqb, Wkb = W[:D], W[D:2 * D], W[2 * D:3 * D], W[3 * D:4 * D], W[4 * D:]
    heads_out = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)

        def proj(w, sl=sl):
            return ref_rope(ref_rms(n @ w[sl].T), c.rope_base)

        q, k, v, qb, kb = proj(Wq), proj(Wk), n @ Wv[sl].T, proj(Wqb), proj(Wkb)
        causal = torch.tril(torch.ones(T, T))
        scores = (q @ k.T) / math.sqrt(dh)
        scores = scores.masked_fill(causal == 0, float("-inf"))
        y = torch.softmax(scores, -1) @ v
        shift = ((qb @ kb.T) / math.sqrt(dh) * causal).sum(-1, keepdim=True)  # no softmax, masked
        heads_out.append(y + shift)
    attn = torch.cat(heads_out, -1) @ block.attn.out.weight.T + block.attn.out.bias
    up = n @ block.ffn.up.weight.T + block.ffn.up.bias
    a, gate = up[:, : c.ff_mult * D], up[:, c.ff_mult * D:]
    ffn = (a * gate * torch.sigmoid(gate)) @ block.ffn.down.weight.T + block.ffn.down.bias
    return block.lam * x + ffn + attn


def block_inputs(c, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, c.dim, generator=g)
    cos, sin = pgpt.rope_tables(c.head_dim, c.max_seq_len, c.rope_base)
    return x, cos[:T], sin[:T]


def test_block_equals_hand_computed_reference():
    c = tiny()
    block = randomize(pgpt.Block(c))
    with torch.no_grad():
        block.lam.fill_(0.7)
    x, cos, sin = block_inputs(c, 6)
    with torch.no_grad():
        out = block(x, cos, sin)
        for b in range(2):
            torch.testing.assert_close(out[b], ref_block(block, c, x[b]), rtol=1e-4, atol=1e-4)


def test_lambda_is_learnable_scalar_or_fixed_one():
    assert pgpt.Block(tiny()).lam.shape == () and pgpt.Block(tiny()).lam.item() == 1.0
    fixed = pgpt.Block(tiny(learn_lambda=False))
    assert fixed.lam is None and all(p.dim() != 0 for p in fixed.parameters())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in pgpt.Model(tiny()).modules())  # N has no parameters


def test_rotary_is_half_split_base_1000():
    cos, sin = pgpt.rope_tables(8, 4, 1000.0)
    x = torch.zeros(1, 1, 4, 8)
    x[..., 1] = 1.0  # pair (1, 5), frequency 1000^(-2/8)
    out = pgpt.apply_rope(x, cos, sin)[0, 0]
    angle = 3 * 1000.0 ** (-2 / 8)
    assert out[3, 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert out[3, 5].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert out[:, [0, 2, 3, 4, 6, 7]].abs().max() < 1e-7


@pytest.mark.parametrize("qk_norm", ["head_rmsnorm", "rmsnorm", "layernorm"])
def test_rotary_is_applied_after_qk_norm(qk_norm, monkeypatch):
    c = tiny(qk_norm=qk_norm)
    attn = randomize(pgpt.SelfAttention(c))
    with torch.no_grad():  # a gain far from 1: the rotary input is the gained, normalised vector
        if qk_norm != "head_rmsnorm":
            attn.q_norm.weight.fill_(3.0)
            attn.k_norm.weight.fill_(3.0)
        if qk_norm == "layernorm":
            attn.q_norm.bias.zero_()
            attn.k_norm.bias.zero_()
    seen = []
    real = pgpt.apply_rope

    def spy(x, cos, sin):
        seen.append(x.detach().clone())
        return real(x, cos, sin)

    monkeypatch.setattr(pgpt, "apply_rope", spy)
    x, cos, sin = block_inputs(c, 5)
    attn(pgpt.rms_norm(x), cos, sin)
    assert len(seen) == 4  # q, k, q_B, k_B
    expected_rms = 1.0 if qk_norm == "head_rmsnorm" else 3.0
    for t in seen:
        if qk_norm == "layernorm":  # over all heads of a position: zero mean, unit variance before the gain
            joint = t.transpose(1, 2).flatten(2) / 3.0
            torch.testing.assert_close(joint.mean(-1), torch.zeros_like(joint.mean(-1)), atol=1e-5, rtol=0)
        else:
            rms = t.pow(2).mean(-1).sqrt() if qk_norm == "head_rmsnorm" else t.transpose(1, 2).flatten(2).pow(2).mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.full_like(rms, expected_rms), atol=1e-4, rtol=1e-4)


def _attention_ii_parts(causal: bool, key_mask=None):
    """The attention output with attention-II minus the same with q_B zeroed, read before the output projection."""
    c = tiny()
    attn = randomize(pgpt.SelfAttention(c))
    with torch.no_grad():
        attn.out.weight.copy_(torch.eye(c.dim))
        attn.out.bias.zero_()
    x, cos, sin = block_inputs(c, 7)
    n = pgpt.rms_norm(x)
    with torch.no_grad():
        on = attn(n, cos, sin, causal=causal, key_mask=key_mask)
        qkv = attn.qkv.weight.clone()
        attn.qkv.weight[3 * c.dim : 4 * c.dim] = 0.0  # q_B = 0: no shift
        off = attn(n, cos, sin, causal=causal, key_mask=key_mask)
        attn.qkv.weight.copy_(qkv)
        # explicit scores
        _, _, _, qb, kb = (attn.heads(t) for t in attn.qkv(n).chunk(5, dim=-1))
        qb = pgpt.apply_rope(pgpt.rms_norm(qb), cos, sin)
        kb = pgpt.apply_rope(pgpt.rms_norm(kb), cos, sin)
        A = qb @ kb.transpose(-1, -2) / math.sqrt(c.head_dim)  # (B, H, T, T), no softmax
        T = x.shape[1]
        mask = torch.tril(torch.ones(T, T)) if causal else torch.ones(T, T)
        mask = mask[None, None].expand(2, 1, T, T).clone()
        if key_mask is not None:
            mask = mask * key_mask[:, None, None, :].float()
        expected = (A * mask).sum(-1)  # (B, H, T): the shift of each head and position
    diff = (on - off).view(2, 7, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, T, dh)
    return diff, expected


@pytest.mark.parametrize("causal", [True, False])
def test_attention_ii_adds_exactly_the_masked_score_sums(causal):
    diff, expected = _attention_ii_parts(causal)
    torch.testing.assert_close(diff, expected[..., None].expand_as(diff), rtol=1e-4, atol=1e-4)


def test_attention_ii_respects_the_padding_mask():
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[0, 5:] = False
    key_mask[1, 2] = False
    diff, expected = _attention_ii_parts(True, key_mask)
    real = key_mask[:, None, :, None].expand_as(diff)  # padding queries' outputs are not meaningful
    torch.testing.assert_close(diff[real], expected[..., None].expand_as(diff)[real], rtol=1e-4, atol=1e-4)


def test_causality_a_future_token_leaves_past_logits_unchanged():
    m = randomize(pgpt.Model(tiny())).eval()
    idx = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 5) % 37
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-5)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_padding_keys_do_not_reach_real_queries():
    m = randomize(pgpt.Model(tiny())).eval()
    idx = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(4))
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[:, 2] = False  # a padding token in the middle
    other = idx.clone()
    other[:, 2] = (other[:, 2] + 11) % 37
    with torch.no_grad():
        a, _ = m(idx, key_mask=key_mask)
        b, _ = m(other, key_mask=key_mask)
    real = key_mask.clone()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)


def test_encoder_block_is_bidirectional_and_decoder_block_reads_memory():
    c = tiny()
    x, cos, sin = block_inputs(c, 6)
    enc = randomize(pgpt.Block(c, causal=False))
    changed = x.clone()
    changed[:, 5] += 1.0
    with torch.no_grad():
        assert (enc(x, cos, sin)[:, 0] - enc(changed, cos, sin)[:, 0]).abs().max() > 1e-3
    dec = randomize(pgpt.Block(c, causal=True, cross=True), seed=2)
    memory = torch.randn(2, 4, c.dim)
    memory_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    other = memory.clone()
    other[0, 3] += 5.0
    other[1, 2:] -= 5.0
    with torch.no_grad():
        out = dec(x, cos, sin, memory=memory, memory_mask=memory_mask)
        torch.testing.assert_close(out, dec(x, cos, sin, memory=other, memory_mask=memory_mask))  # padded memory
        assert (out - dec(x, cos, sin, memory=memory + 1.0, memory_mask=memory_mask)).abs().max() > 1e-3


@pytest.mark.parametrize("switches", [
    {"norm": "layernorm"}, {"norm": "layernorm_nobias"}, {"norm": "l2norm"}, {"norm": "none"},
    {"qk_norm": "rmsnorm"}, {"qk_norm": "layernorm"}, {"qk_norm": "l2norm"}, {"qk_norm": "none"},
    {"learn_lambda": False, "softcap": 0.0, "z_loss": 0.0, "z_loss_kind": "token", "loss_mean": "token"},
])
def test_every_switch_trains_and_caches_consistently(switches):
    m = randomize(pgpt.Model(tiny(**switches)))
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(8))
    logits, loss = m(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        cache = m.new_cache(2)
        stepwise = torch.cat([m(idx[:, :5], cache=cache)[0]] + [m(idx[:, p : p + 1], cache=cache, pos=p)[0]
                                                                for p in range(5, 9)], 1)
        torch.testing.assert_close(stepwise, m(idx)[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# logits and losses


def test_softcap_and_z_loss_formulas():
    z = torch.tensor([[-100.0, 0.0, 3.0, 100.0]])
    torch.testing.assert_close(pgpt.softcap(z, 30.0), 30.0 * torch.tanh(z / 30.0))
    assert pgpt.softcap(z, 30.0).abs().max() < 30.0 and torch.equal(pgpt.softcap(z, 0.0), z)
    logits = torch.randn(2, 3, 5)
    assert pgpt.z_loss(logits, "global").item() == pytest.approx(math.log(logits.exp().sum().item()) ** 2, rel=1e-5)
    per_token = torch.log(logits.exp().sum(-1)) ** 2
    assert pgpt.z_loss(logits, "token").item() == pytest.approx(per_token.mean().item(), rel=1e-5)


def test_model_loss_is_softcapped_ce_plus_z_loss_on_raw_logits():
    c = tiny(softcap=2.0, z_loss=1e-2)
    m = randomize(pgpt.Model(c))
    idx = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(5))
    targets = idx.roll(-1, 1)
    targets[0, 4:] = -1  # masked targets are ignored
    logits, loss = m(idx, targets)
    with torch.no_grad():
        x = pgpt.rms_norm(m.embed(idx))
        cos, sin = m.rope_cos[:9], m.rope_sin[:9]
        for block in m.blocks:
            x = block(x, cos, sin)
        z = m.lm_head(pgpt.rms_norm(x))
    torch.testing.assert_close(logits, 2.0 * torch.tanh(z / 2.0))
    assert logits.abs().max() < 2.0 and logits.dtype == torch.float32
    ce = F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1), ignore_index=-1, reduction="none").view(3, 9)
    per_seq = torch.stack([ce[0, :4].mean(), ce[1].mean(), ce[2].mean()])  # the seed's mean over sequences
    expected = per_seq.mean() + 1e-2 * torch.logsumexp(z.flatten(), 0) ** 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    _, token_loss = pgpt.Model(tiny(loss_mean="token", z_loss=0.0)).eval()(idx, targets)
    assert token_loss.item() == pytest.approx(math.log(37), rel=1e-6)  # zero-initialised head: uniform


def test_sequence_mean_skips_rows_without_targets():
    logits = torch.randn(3, 4, 6)
    targets = torch.tensor([[1, 2, -1, -1], [-1, -1, -1, -1], [0, 5, 4, 3]])
    ce = F.cross_entropy(logits.reshape(-1, 6), targets.clamp(min=0).reshape(-1), reduction="none").view(3, 4)
    expected = (ce[0, :2].mean() + ce[2].mean()) / 2
    assert pgpt.lm_loss(logits, targets, "sequence").item() == pytest.approx(expected.item(), rel=1e-6)


def test_head_is_zero_initialised_and_embedding_is_standard_normal():
    m = pgpt.Model(tiny(vocab_size=500, dim=64, head_dim=32))
    assert torch.count_nonzero(m.lm_head.weight) == 0
    assert m.embed.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert not hasattr(m.lm_head, "bias") or m.lm_head.bias is None


# ---------------------------------------------------------------------------------------------------------
# recipe, optimizer groups


def test_recipe_groups_get_their_learning_rates_betas_and_no_weight_decay():
    r = recipe_lib.load(ROOT / "recipes" / "pgpt_lformer.toml",
                        ["model.dim=16", "model.n_heads=2", "model.head_dim=8", "model.n_layers=2"])
    m = pgpt.Model(r.model.__class__(**{**r.model.__dict__, "vocab_size": 41}))
    opts = build_optimizers(m, r.train, "cpu")
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.Adam) and not isinstance(opts[0], torch.optim.AdamW)
    groups = {g["name"]: g for g in opts[0].param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {"embedding": 0.3, "head": 0.002, "matrix": 0.02, "scalar": 0.02}
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.0 for g in groups.values())
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert all(p.dim() >= 2 for p in groups["matrix"]["params"]) and all(p.dim() < 2 for p in groups["scalar"]["params"])
    assert any(p is m.blocks[0].lam for p in groups["scalar"]["params"])
    assert r.train.schedule == "asr" and (r.train.warmup_iters, r.train.decay_iters) == (40, 256)
    assert r.train.batch_size * r.train.grad_accum == 256 and r.train.max_iters == 4500


def test_seed_shape_and_bad_config_is_a_one_line_user_error():
    r = recipe_lib.load(ROOT / "recipes" / "pgpt_lformer.toml")
    c = r.model
    assert (c.dim, c.n_layers, c.n_heads, c.head_dim, c.ff_mult, c.max_seq_len, c.rope_base) == \
        (768, 4, 12, 64, 4, 512, 1000.0)
    assert r.tokenizer.kind == "tiktoken" and r.tokenizer.encoding == "gpt2" and r.train.compile
    with pytest.raises(UserError, match=r"head_dim: expected n_heads \* head_dim == dim"):
        recipe_lib.load(ROOT / "recipes" / "pgpt_lformer.toml", ["model.head_dim=32"])
    with pytest.raises(UserError, match="qk_norm: expected one of"):
        recipe_lib.load(ROOT / "recipes" / "pgpt_lformer.toml", ["model.qk_norm=bogus"])
    cpu = recipe_lib.load(ROOT / "recipes" / "pgpt_lformer_cpu.toml")
    assert cpu.model.family == "pgpt" and not cpu.train.compile


# ---------------------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("attention_ii", [True, False])
def test_kv_cache_logits_equal_full_sequence_logits(attention_ii):
    m = randomize(pgpt.Model(tiny(attention_ii=attention_ii))).eval()
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = m(idx)
        cache = m.new_cache(2)
        parts = [m(idx[:, :4], cache=cache, pos=0)[0]]  # a prompt
        parts += [m(idx[:, p : p + 1], cache=cache, pos=p)[0] for p in range(4, 8)]  # one token at a time
        parts.append(m(idx[:, 8:], cache=cache, pos=8)[0])  # a chunk after earlier tokens
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_generation_through_the_shared_loop_matches_greedy_recompute():
    from toolkit import generate
    from toolkit.models.common import CachedDecoder

    m = randomize(pgpt.Model(tiny())).eval()
    prompt = [3, 14, 15]
    got = generate.generate(m, prompt, max_new_tokens=6, sampling=generate.Sampling(temperature=0.0))
    assert isinstance(generate.decoder_for(m), CachedDecoder)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(m(torch.tensor([ids]))[0][0, -1].argmax()))
    assert got == ids[3:]
    assert len(generate.generate(m, prompt, max_new_tokens=50)) == 12 - 3  # stops at the context


# ---------------------------------------------------------------------------------------------------------
# training end to end

TINY_PGPT = """
name = "tiny_pgpt"
[model]
family = "pgpt"
dim = 32
n_layers = 2
n_heads = 4
head_dim = 8
ff_mult = 2
max_seq_len = 32
[tokenizer]
kind = "bytes"
n_sentinels = 0
[data]
source = "synthetic"
synthetic_stories = 300
[train]
device = "cpu"
dtype = "float32"
optimizer = "adam"
batch_size = 4
grad_accum = 2
max_iters = 30
lr = 0.01
schedule = "asr"
warmup_iters = 3
decay_iters = 10
weight_decay = 0.0
grad_clip = 0.0
eval_interval = 30
eval_iters = 2
log_interval = 5
[train.groups.embedding]
lr = 0.1
[train.groups.head]
lr = 0.003
"""


def test_tiny_training_run_learns_reloads_and_chats(tmp_path, capsys):
    import json

    from conftest import lmkit

    from toolkit import run as run_lib
    from toolkit.train.loop import train

    path = tmp_path / "tiny_pgpt.toml"
    path.write_text(TINY_PGPT)
    summary = train(recipe_lib.load(path), tmp_path / "run")
    assert summary["step"] == 30 and summary["val_loss"] < math.log(259) - 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    loaded = run_lib.load_run(tmp_path / "run")
    assert loaded.recipe.model.family == "pgpt" and loaded.step == 30
    code, out, err = lmkit(capsys, "chat", str(tmp_path / "run"), "--prompt", "Once upon", "-n", "8", "-t", "0")
    assert code == 0, err
    assert len(out.rstrip("\n")) <= 8  # greedy, at most 8 byte tokens (fewer if it stops at EOS)
