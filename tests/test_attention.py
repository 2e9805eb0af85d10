"""model.attention: matmul attention computes what torch's scaled_dot_product_attention computes, the llama with
it is the same model (same weights, logits, gradients, cache), and `auto` takes it for bf16 on CPU only."""

import pytest
import torch
import torch.nn.functional as F

from toolkit import recipe as recipe_lib
from toolkit.errors import RecipeError
from toolkit.models.common import MATMUL_ATTENTION_MAX_KEYS, causal_mask, matmul_attention
from toolkit.models.llama import Config, Model

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)


def qkv(tq=7, tk=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, tq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, tk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, tk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("case", ["causal", "chunk after a cache", "one new token", "no mask"])
def test_matmul_attention_equals_sdpa_and_its_gradients(case):
    tq, tk = {"causal": (7, 7), "chunk after a cache": (3, 7), "one new token": (1, 7), "no mask": (5, 5)}[case]
    mask = causal_mask(tq, tk) if case == "chunk after a cache" else None
    causal = case == "causal"
    outs = []
    for fn in (F.scaled_dot_product_attention, matmul_attention):
        q, k, v = qkv(tq, tk)
        y = fn(q, k, v, attn_mask=mask, is_causal=causal)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y, q.grad, k.grad, v.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-12)
    if case == "causal":  # the last key is seen by the last query only: its gradient is zero for the others
        y, *_ = outs[1]
        q, k, v = qkv(tq, tk)
        v2 = v.detach().clone()
        v2[:, :, -1] += 100.0
        y2 = matmul_attention(q, k, v2, is_causal=True)
        assert torch.equal(y2[:, :, :-1], y.detach()[:, :, :-1]) and not torch.allclose(y2[:, :, -1], y[:, :, -1])


def build(attention: str, **kw) -> Model:
    torch.manual_seed(0)
    return Model(Config(**{**SMALL, **kw, "attention": attention})).double()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_a_llama_with_matmul_attention_is_the_same_model(qk_norm):
    idx = torch.arange(24).reshape(2, 12) % 64
    ref, alt = build("sdpa", qk_norm=qk_norm), build("matmul", qk_norm=qk_norm)
    a, b = ref.state_dict(), alt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the switch adds no weight
    (la, lossa), (lb, lossb) = ref(idx, idx.roll(-1, 1)), alt(idx, idx.roll(-1, 1))
    assert torch.allclose(la, lb, atol=1e-10) and torch.allclose(lossa, lossb, atol=1e-12)
    lossa.backward()
    lossb.backward()
    for (name, pa), (_, pb) in zip(ref.named_parameters(), alt.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-10), name
    # the KV-cache path (a prompt, then a chunk after it, then one token) gives the whole sequence's logits
    cache = alt.new_cache(2)
    with torch.no_grad():
        parts = [alt(idx[:, :5], cache=cache, pos=0)[0], alt(idx[:, 5:11], cache=cache, pos=5)[0],
                 alt(idx[:, 11:], cache=cache, pos=11)[0]]
    assert torch.allclose(torch.cat(parts, dim=1), la, atol=1e-10)


def test_auto_takes_matmul_attention_for_bf16_on_cpu_only(monkeypatch):
    """`auto` is matmul attention under bf16 autocast on CPU (where it is the faster) and torch's SDPA for fp32
    and for long sequences."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    idx = torch.arange(24).reshape(2, 12) % 64
    torch.manual_seed(0)
    m = Model(Config(**SMALL, attention="auto"))
    m(idx)
    assert len(calls) == SMALL["n_layers"]  # fp32: SDPA
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = m(idx)
    assert calls == [] and logits.dtype == torch.bfloat16
    torch.manual_seed(0)
    ref = Model(Config(**SMALL, attention="sdpa"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, _ = ref(idx)
    assert len(calls) == SMALL["n_layers"]
    # bf16 rounds differently in the two kernels, not more: the logits agree to bf16's precision
    assert torch.allclose(logits.float(), ref_logits.float(), atol=0.05)
    # past MATMUL_ATTENTION_MAX_KEYS keys auto keeps SDPA (the (T, T) probabilities grow with the length)
    calls.clear()
    torch.manual_seed(0)
    long = Model(Config(**{**SMALL, "max_seq_len": MATMUL_ATTENTION_MAX_KEYS + 1}, attention="auto"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        long(torch.zeros(1, MATMUL_ATTENTION_MAX_KEYS, dtype=torch.long))
        assert calls == []
        long(torch.zeros(1, MATMUL_ATTENTION_MAX_KEYS + 1, dtype=torch.long))
    assert len(calls) == SMALL["n_layers"]


def test_attention_is_checked_and_a_fine_tune_may_change_it(tmp_path):
    assert Config().attention == "sdpa"  # the default is today's kernel
    with pytest.raises(RecipeError, match="one of 'sdpa', 'matmul', 'auto', got 'flash'"):
        Config(attention="flash")
    base = recipe_lib.load("recipes/inner_arianna.toml", [])
    assert base.model.attention == "auto"
    ft = recipe_lib.load_onto("recipes/inner_arianna_sft.toml", ["model.attention=sdpa"], base, "out/base")
    assert ft.model.attention == "sdpa" and ft.model.dim == base.model.dim
