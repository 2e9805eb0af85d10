import math

import pytest
import torch

from toolkit import models
from toolkit import recipe as recipe_lib
from toolkit.errors import UserError
from toolkit.models import gpt2

V, T = 50, 12


def config(**kw) -> gpt2.Config:
    base = dict(dim=32, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=16, dropout=0.0)
    return gpt2.Config(**{**base, **kw})


def build(seed=0, **kw) -> gpt2.Model:
    torch.manual_seed(seed)
    return gpt2.Model(config(**kw)).eval()


def test_resonance_matrix_by_matmul_equals_the_pairwise_formula():
    torch.manual_seed(0)
    phases = torch.randn(3, T, 32) * 2.0
    R = gpt2.resonance_matrix(phases, phases)
    explicit = torch.cos(phases[:, :, None, :] - phases[:, None, :, :]).mean(-1)  # B x S x S x F, the slow way
    torch.testing.assert_close(R, explicit, atol=1e-5, rtol=0)
    assert torch.allclose(R.diagonal(dim1=1, dim2=2), torch.ones(3, T), atol=1e-6)
    assert torch.allclose(R, R.transpose(1, 2), atol=1e-6)


def test_model_uses_the_same_r_as_the_explicit_formula():
    m = build(resonance=True)
    idx = torch.randint(0, V, (2, T))
    R, causal = m.resonance_bias(idx)
    phi = m.phase(idx)
    explicit = torch.cos(phi[:, :, None, :] - phi[:, None, :, :]).mean(-1)
    torch.testing.assert_close(R, explicit, atol=1e-5, rtol=0)
    assert causal.shape == (T, T) and torch.isinf(causal[0, 1]) and causal[1, 0] == 0


def test_same_token_bias_is_the_token_identity_kernel():
    m = build(resonance=True, resonance_bias="same_token")
    idx = torch.tensor([[1, 2, 1, 3, 2]])
    R, _ = m.resonance_bias(idx)
    expected = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 1.0]])
    assert torch.equal(R[0], expected)


def test_lambda_zero_and_blend_to_zero_equals_the_baseline_on_the_same_weights():
    base = build(seed=1)
    res = build(seed=2, resonance=True)
    res.load_state_dict(base.state_dict(), strict=False)  # shared weights from the baseline
    with torch.no_grad():
        res.blend.fill_(-1e4)  # sigmoid(-1e4) == 0 exactly: no phase path
        for block in res.blocks:
            block.attn.res_lambda.zero_()
    idx = torch.randint(0, V, (2, T))
    a, b = base(idx)[0], res(idx)[0]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the switches do matter
        res.blocks[0].attn.res_lambda.fill_(1.0)
    assert (res(idx)[0] - a).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(resonance=True), dict(resonance=True, resonance_bias="same_token"),
                                dict(resonance=True, phase_blend=False), dict()])
def test_no_future_leakage_with_the_bias(kw):
    m = build(**kw)
    with torch.no_grad():  # a strong bias makes any leak visible
        for block in m.blocks:
            if block.attn.res_lambda is not None:
                block.attn.res_lambda.fill_(3.0)
    idx = torch.randint(0, V, (1, T))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 7) % V
    a, b = m(idx)[0], m(changed)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(resonance=True), dict(resonance=True, resonance_bias="same_token")])
def test_kv_cache_logits_equal_full_sequence_logits(kw):
    m = build(**kw)
    idx = torch.randint(0, V, (2, T))
    full = m(idx)[0]
    cache = m.new_cache(2)
    first = m(idx[:, :5], cache=cache, pos=0)[0]  # a prompt chunk, then a chunk after it, then single tokens
    second = m(idx[:, 5:8], cache=cache, pos=5)[0]
    rest = [m(idx[:, t : t + 1], cache=cache, pos=t)[0] for t in range(8, T)]
    torch.testing.assert_close(torch.cat([first, second, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_ablation_switches_change_the_parameters():
    n = {name: build(**kw).num_params() for name, kw in {
        "base": {}, "res": dict(resonance=True), "no_r": dict(resonance=True, resonance_bias="none"),
        "no_blend": dict(resonance=True, phase_blend=False)}.items()}
    F_, D, L, H = 32, 32, 2, 4
    assert n["res"] - n["base"] == V * F_ + F_ * D + D + L * H  # phase table, projection, blend, lambdas
    assert n["no_r"] - n["base"] == V * F_ + F_ * D + D
    assert n["no_blend"] - n["base"] == V * F_ + L * H
    m = build(resonance=True, freeze_phases=True)
    assert not m.phase.weight.requires_grad
    # FLOPs: the projection, blend and lambdas, and the rank-2F product for R; the phase table is a lookup
    extra = build(resonance=True).flops_per_token(16) - build().flops_per_token(16)
    assert extra == 6 * (F_ * D + D + L * H) + 3 * 2 * (2 * F_) * 16


def test_position_init_switch():
    fair = build(dim=256, n_heads=4)
    faithful = build(dim=256, n_heads=4, seed_faithful_position_init=True)
    assert abs(fair.pos_emb.weight.std().item() - 0.02) < 0.003
    assert abs(faithful.pos_emb.weight.std().item() - 1.0) < 0.05


def test_rhyme_groups_and_init_with_a_small_dictionary():
    rhymes = {"cat": "AE1 T", "hat": "AE1 T", "sun": "AH1 N", "run": "AH1 N"}
    groups = gpt2.rhyme_groups([" Cat", "hat!", "a", " sun", "xyz", "Run", "x1"], rhymes.get)
    assert groups == {"AE1 T": [0, 1], "AH1 N": [3, 5]}
    w = torch.zeros(7, 32)
    gpt2.apply_rhyme_groups(w, groups, 0.3, torch.Generator().manual_seed(0))
    assert (w[0] - w[1]).abs().max() < 0.2 and (w[0] - w[3]).abs().max() > 0.2
    assert w[2].abs().sum() == 0  # not in any group: keeps its own init
    R = gpt2.resonance_matrix(w[None], w[None])[0]
    assert R[0, 1] > R[0, 3]  # rhyming tokens resonate more


def test_recipes_load_and_validate(tmp_path):
    for name in ("resonance", "gpt2_baseline", "resonance_seed", "gpt2_baseline_seed"):
        r = recipe_lib.load(name)
        assert r.model.family == "gpt2"
    assert recipe_lib.load("resonance").model.resonance and not recipe_lib.load("gpt2_baseline").model.resonance
    seed = recipe_lib.load("resonance_seed").model
    assert (seed.dim, seed.n_layers, seed.n_heads, seed.max_seq_len) == (768, 12, 12, 256)
    with pytest.raises(UserError, match="resonance_bias: expected one of"):
        recipe_lib.load("resonance", ["model.resonance_bias=identity"])


def test_seed_size_parameter_counts_match_the_seed():
    # seeds.md §3.2: 123.81 M (standard) and 125.45 M (resonance) at 768/12/12, vocab 50257, 256 positions
    with torch.device("meta"):
        std = models.build(gpt2.Config(vocab_size=50257))
        res = models.build(gpt2.Config(vocab_size=50257, resonance=True))
    assert math.isclose(std.num_params() / 1e6, 123.81, abs_tol=0.01)
    assert math.isclose(res.num_params() / 1e6, 125.45, abs_tol=0.01)
