"""The attractor family (BoggersTheLLM): relaxation, loss terms, switches, generation, training."""

from __future__ import annotations

import json
import math

import attractor_reference as reference
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit import recipe as recipe_lib
from toolkit.errors import RecipeError, UserError
from toolkit.models.attractor import Config, Model, relax
from toolkit.models.attractor import model as attractor_model

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=50, window=4, dim=8, n_waves=2, steps=3, max_seq_len=8, train_positions=0)


def tiny(**kw) -> Model:
    torch.manual_seed(0)
    return Model(Config(**{**TINY, **kw}))


# ---- the relaxation against the reference written out from the seed (tests/attractor_reference.py) ---------


def test_one_relaxation_step_equals_the_hand_written_reference():
    m = tiny(steps=1, dt=5.0, loss="ce")  # a large dt so that the energy step is visible
    with torch.no_grad():
        m.coupling_asym.fill_(0.3)
    S0 = m.embed(torch.randint(0, 50, (3, 4)))
    torch.manual_seed(2)
    ref, _, T_ref = reference.relax(m, S0, rows=3)
    torch.manual_seed(2)
    with torch.no_grad():
        out, _, T = m.relax(S0, rows=3, keep_states=False)
    assert T.max() > relax.HIGH_TENSION  # the break fired (as on every step of the seed's runs)
    assert not torch.allclose(ref, F.normalize(S0.unflatten(-1, (2, -1)), dim=-1).flatten(-2), atol=1e-3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(T, T_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["fast", "hand_backward_off", "seed_style"])
def test_relaxation_paths_equal_the_seed_reference_with_gradients(path):
    """The fast path (with the hand-written backward, and through autograd) and the seed-style loop of
    `vectorized = false` against the reference, in training: logits, the whole loss and its gradients."""
    x = torch.randint(0, 50, (3, 8))
    y = torch.randint(0, 50, (3, 8))
    out = {}
    for ref in (True, False):
        m = tiny(vectorized=path != "seed_style", steps=4, dt=2.0)
        m.hand_backward = path != "hand_backward_off"
        if ref:
            m.relax = lambda S, rows, keep_states, m=m: reference.relax(m, S, rows, keep_states)
        m.train()
        torch.manual_seed(1)
        logits, loss = m(x, y)
        loss.backward()
        out[ref] = (logits.detach(), loss.item(), m.energy_w1.grad.clone(), m.embedder.weight.grad.clone())
    (la, a, ga, ea), (lb, b, gb, eb) = out[False], out[True]
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)  # second-order grads of the energy heads agree
    torch.testing.assert_close(ea, eb, atol=1e-6, rtol=1e-4)
    assert ga.abs().sum() > 0


def test_per_wave_norms_hold_after_every_step_and_breaks_fire():
    m = tiny(steps=6)
    S0 = m.embed(torch.randint(0, 50, (5, 4)))
    with torch.no_grad():
        _, states, T = m.relax(S0, rows=5, keep_states=True)
    assert len(states) == 6
    for S in states:
        norms = S.unflatten(-1, (2, -1)).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    # without breaks the state moves less; with them (tension is high here) every step escapes
    m2 = tiny(steps=6, breaks=False)
    with torch.no_grad():
        S_nb, _, _ = m2.relax(S0, rows=5, keep_states=False)
    assert T.max() > relax.HIGH_TENSION and not torch.allclose(S_nb, states[-1])


def test_tension_and_break_formulas():
    S = F.normalize(torch.randn(2, 4, 6), dim=-1)
    T = relax.tension(S)
    a, b = S[:, 1:], S[:, :-1]
    expect = ((a - b) ** 2).mean((1, 2)) + 0.35 * (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean(1)
    torch.testing.assert_close(T, expect)
    # a high-tension break moves each position by alpha along its own change, then renormalises per wave
    start = F.normalize(torch.randn(2, 4, 8), dim=-1)
    S = F.normalize(start + 0.5 * torch.randn(2, 4, 8), dim=-1)
    Tv = torch.tensor([0.3, 0.05])
    direction = F.normalize(torch.randn(4, 2, 8), dim=-1)  # (a break's direction where there is no change)
    out, _ = relax.seed_break(S.transpose(0, 1), start.transpose(0, 1), Tv, torch.zeros(1), 2, direction, 2, True)
    out = out.transpose(0, 1)
    alpha = 0.1 * min(max((0.12 - Tv.mean().item()) / 0.12, 0.1), 2.0)
    delta = S - start
    moved = S + alpha * delta / delta.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, relax.wave_normalize(moved, 2))
    same, _ = relax.seed_break(S.transpose(0, 1), start.transpose(0, 1), torch.tensor([0.1, 0.1]), torch.zeros(1), 2,
                               direction, 2, True)
    torch.testing.assert_close(same.transpose(0, 1), S)  # no rule fires


def test_low_tension_break_needs_four_steps_in_a_row():
    S = F.normalize(torch.randn(1, 4, 8), dim=-1)
    start = F.normalize(torch.randn(1, 4, 8), dim=-1)
    direction = F.normalize(torch.randn(1, 4, 8), dim=-1)
    count = torch.zeros(1)
    for k in range(4):
        out, count = relax.seed_break(S, start, torch.tensor([0.01]), count, 1, direction, 2, True)
        assert torch.equal(out, S) == (k < 3)
    assert count.item() == 0  # reset after firing


def test_coupling_matrix_is_the_seed_laplacian():
    g, s, dt, a = torch.tensor(0.52), torch.tensor(0.07), torch.tensor(0.09), torch.tensor(0.4)
    M = relax.coupling_matrix(g, s, dt, a, 5)
    for i in range(5):
        for j in range(5):
            if i != j:
                w = math.exp(-0.52 * abs(i - j)) * max(0.2, 1 + 1.25 * math.tanh(0.4) * (1 if j > i else -1))
                assert M[i, j].item() == pytest.approx(0.09 * 0.07 * w, rel=1e-5)
    torch.testing.assert_close(M.sum(1), torch.ones(5))  # a Laplacian step keeps constants


# ---- loss terms --------------------------------------------------------------------------------------------


def test_trajectory_loss_terms_equal_their_formulas():
    """lmkit's earlier readings (the entropy floor 1 + T, stacking penalties); the seed's: test_attractor_seed.py."""
    m = tiny(steps=4, entropy_floor="lmkit", stack_repeat_penalties=True)
    m.train()
    N, W, D, V = 6, 4, 8, 50
    torch.manual_seed(3)
    states = [F.normalize(torch.randn(N, W, D), dim=-1) for _ in range(4)]
    S, T_final = states[-1], torch.rand(N) * 0.3
    logits = torch.randn(N, V)
    logits[:2] *= 30  # two sharp windows: below the entropy floor, they get the extra noise
    ctx = torch.randint(0, V, (N, W))
    ctx[0, -2:] = ctx[0, -1]  # a repeated token: its penalties add up
    y = torch.randint(0, V, (N,))
    torch.manual_seed(7)
    terms = m.trajectory_loss(states, S, T_final, logits, ctx, y, rows=N)

    torch.manual_seed(7)
    perm = torch.rand(3 * N).argsort()
    noise1 = torch.randn(N, V)
    noise2 = torch.randn(2, V)  # drawn only for the windows below the entropy floor (the first two: asserted)
    flat = F.normalize(torch.stack(states).flatten(2), dim=-1)
    pred, teach = flat[:-1].flatten(0, 1), flat[1:].flatten(0, 1)
    core = F.relu(0.2 - (pred * teach).sum(-1) + (pred * teach[perm]).sum(-1)).mean()
    assert terms["traj_contrast"].item() == pytest.approx(core.item(), rel=1e-5)
    t = T_final.mean()
    assert terms["floor"].item() == pytest.approx((2.0 * (1 + 0.5 * (1 - torch.sigmoid(8 * (t - 0.12))))).item())
    assert terms["repulsion"].item() == 0.0  # empty memory
    e = m.energy_rows(S)
    assert terms["energy_reg"].item() == pytest.approx(0.001 * (e**2).mean().item(), rel=1e-5)
    E = m.embedder.weight
    bias = 0.025 * E[ctx[:, -1]] @ E.t()
    for n in range(N):
        bias[n, ctx[n, -1]] -= 2.0
        for tok in ctx[n, -3:]:
            bias[n, tok] -= 1.0
    assert torch.allclose(attractor_model.shape_logits(torch.zeros(N, V), ctx, E, stack=True), bias, atol=1e-6)
    shaped = logits + bias + 0.005 * noise1
    ent = -(shaped.softmax(-1) * shaped.log_softmax(-1)).sum(-1)
    assert (ent < 1.0 * (1 + t)).tolist() == [True, True, False, False, False, False]
    shaped[:2] += 0.12 * noise2
    ent = -(shaped.softmax(-1) * shaped.log_softmax(-1)).sum(-1)
    tok = F.cross_entropy(shaped, y, label_smoothing=0.06) - 0.03 * ent.mean()
    assert terms["token_aux_ce"].item() == pytest.approx(tok.item(), rel=1e-5)
    last = m.readout(S[:, -1]) / F.softplus(m.temperature_raw)
    ro = F.cross_entropy(last, y, label_smoothing=0.06)
    assert terms["readout_aux_ce"].item() == pytest.approx(ro.item(), rel=1e-5)
    total = core + terms["floor"] + 0 + terms["energy_reg"] + 0.2 * tok + 0.15 * ro
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert 0.1 * F.softplus(m.temperature_raw).item() == pytest.approx(0.012)


def test_repulsion_sign_as_the_seed_and_switched():
    out = {}
    for sign in (-1.0, 1.0):
        m = tiny(repulsion_sign=sign, repulsion_pool="window")  # (the seed's pooling: test_attractor_seed.py)
        m.train()
        S1 = F.normalize(torch.randn(4, 4, 8), dim=-1)
        S2 = S1 + 0.1 * torch.randn(4, 4, 8)
        m.repulsion(S1)  # fills the memory with batch 1's mean
        cos = F.cosine_similarity(S1.mean(0).flatten(), S2.mean(0).flatten(), dim=0)
        rep = m.repulsion(S2)
        assert rep.item() == pytest.approx(cos.item(), rel=1e-5)
        out[sign] = sign * 0.08 * rep.item()
    assert out[-1.0] < 0 < out[1.0]  # the seed subtracts the similarity: minimising it attracts
    assert m.memory_count.item() == 2


def test_ce_loss_is_plain_token_ce():
    m = tiny(loss="ce")
    m.train()
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    y[0, 3] = -1
    logits, loss = m(x, y)
    assert logits.shape == (2, 8, 50)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 50), y.reshape(-1), ignore_index=-1).item())


# ---- switches ----------------------------------------------------------------------------------------------


def grads_after_step(**kw) -> Model:
    m = tiny(**kw)
    m.train()
    _, loss = m(torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8)))
    loss.backward()
    return m


def test_backprop_through_relaxation_gives_the_coupling_gradients():
    seed = grads_after_step()
    for p in (seed.coupling_gamma, seed.coupling_scale, seed.coupling_dt, seed.coupling_asym):
        assert p.grad is None  # frozen at init, as in the seed
    assert seed.energy_w1.grad is not None and seed.readout_window.weight.grad is not None
    full = grads_after_step(backprop_through_relaxation=True)
    for p in (full.coupling_gamma, full.coupling_scale, full.coupling_dt):
        assert p.grad is not None and p.grad.abs() > 0


def test_per_sample_energy_makes_the_step_independent_of_the_batch():
    for per_sample, same in ((False, False), (True, True)):
        m = tiny(per_sample_energy=per_sample, breaks=False, dt=3.0)
        S0 = m.embed(torch.randint(0, 50, (4, 4)))
        with torch.no_grad():
            alone, _, _ = m.relax(S0[:1], rows=1, keep_states=False)
            batch, _, _ = m.relax(S0, rows=4, keep_states=False)
        assert torch.allclose(alone[0], batch[0], atol=1e-6) == same


def test_energy_rows_pins_the_batch_mean():
    m = tiny(energy_rows=4, breaks=False, dt=3.0)
    S0 = m.embed(torch.randint(0, 50, (4, 4)))
    with torch.no_grad():
        alone, _, _ = m.relax(S0[:1], rows=1, keep_states=False)  # generation: one row
        batch, _, _ = m.relax(S0, rows=4, keep_states=False)  # training: four rows
    torch.testing.assert_close(alone[0], batch[0])


def test_config_validation_is_one_clear_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[model]\nfamily = "attractor"\ndim = 10\nn_waves = 4\n')
    with pytest.raises(UserError, match=r"\[model\].n_waves: expected a divisor of dim=10"):
        recipe_lib.load(p)
    with pytest.raises(UserError, match="repulsion_sign"):
        recipe_lib.load("attractor_a1", ["model.repulsion_sign=2"])
    r = recipe_lib.load("attractor_a1")
    assert r.tokenizer.cap_policy == "fold" and r.tokenizer.vocab_cap == 8192
    assert r.model.window == 8 and r.model.dim == 128 and r.model.n_waves == 4 and r.model.steps == 32
    assert recipe_lib.load("attractor_a1c").model.token_aux_ce == 0.5


def test_step_schedule_is_steplr():
    from toolkit.recipe import TrainConfig
    from toolkit.train.optim import lr_factor

    cfg = TrainConfig(lr=1.0, schedule="step", step_size=5, gamma=0.8, warmup_iters=0, max_iters=20)
    assert [round(lr_factor(s, cfg), 6) for s in (0, 4, 5, 9, 10, 19)] == [1.0, 1.0, 0.8, 0.8, 0.64, 0.512]
    with pytest.raises(UserError, match="step_size"):
        recipe_lib.load("attractor_a1", ["train.step_size=0"])


# ---- token stream, generation, metrics ----------------------------------------------------------------------


def test_every_position_is_scored_with_its_own_window():
    m = tiny()
    m.eval()
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        logits, _ = m(x)
        assert logits.shape == (2, 8, 50)
        for t in (0, 2, 5, 7):
            ctx = x[:, max(0, t - 3) : t + 1]
            ctx = torch.cat([x[:, :1].expand(-1, 4 - ctx.shape[1]), ctx], 1)  # left-padded with the first id
            alone, _ = m(ctx)
            # rows=2 in both calls: the same energy scale, and breaks are decided per position
            torch.testing.assert_close(alone[:, -1], logits[:, t], atol=1e-5, rtol=1e-5)
    m.train()
    logits, loss = Model(Config(**{**TINY, "train_positions": 1}))(x, x)
    assert logits.shape == (2, 1, 50) and loss.isfinite()


def test_generation_respects_the_window():
    from toolkit import generate as gen

    m = tiny()
    dec = gen.decoder_for(m)
    tail = [5, 6, 7, 8]
    a = dec.logits([1, 2, 3] + tail)
    b = dec.logits([9, 9, 9, 9, 9, 9] + tail)
    torch.testing.assert_close(a, b)  # only the last W = 4 tokens matter
    assert not torch.allclose(a, dec.logits([1, 2, 3, 4, 6, 7, 8]))
    out = gen.generate(m, [1, 2], max_new_tokens=12, sampling=gen.Sampling(temperature=1.02, top_k=28, seed=0))
    assert len(out) == 12 and all(0 <= i < 50 for i in out)
    seed_sampler = gen.Sampling(**{**m.sampling_defaults(), "seed": 0})
    pen = gen.penalize(np.zeros(50, np.float32), [3, 4, 5, 6, 7], seed_sampler)
    assert pen[3] == 0 and pen[4] == pytest.approx(-1.35) and pen[7] == pytest.approx(-6.35)
    assert gen.penalize(np.zeros(50, np.float32), [4, 4], seed_sampler)[4] == pytest.approx(-2 * 1.35 - 5.0)
    out = gen.generate(m, [1, 2], max_new_tokens=12, sampling=seed_sampler)
    assert all(a != b for a, b in zip(out, out[1:]))  # the last-token penalty of 5 nats forbids immediate repeats


def test_eval_forward_reports_the_seed_val_ce():
    m = tiny()
    m.eval()
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        logits, extras = m.eval_forward(x, y)
        torch.testing.assert_close(logits, m(x)[0])
    ctx = m.windows(x).reshape(-1, 4)
    shaped = logits.reshape(-1, 50) + attractor_model.shape_logits(torch.zeros(16, 50), ctx, m.embedder.weight)
    expect = F.cross_entropy(shaped, y.reshape(-1), label_smoothing=0.06, reduction="sum").item()
    assert extras["seed_val_ce"] == pytest.approx(expect, rel=1e-5)


ATTRACTOR_RECIPE = """
name = "tiny-attractor"
[model]
family = "attractor"
window = 4
dim = 16
n_waves = 2
steps = 3
max_seq_len = 16
train_positions = 0
[tokenizer]
kind = "bytes"
n_sentinels = 0
[data]
source = "synthetic"
synthetic_stories = 100
[train]
device = "cpu"
dtype = "float32"
batch_size = 8
max_iters = 16
optimizer = "adam"
lr = 3e-3
schedule = "step"
step_size = 10
gamma = 0.8
warmup_iters = 0
eval_interval = 8
eval_iters = 2
log_interval = 4
"""


def test_train_end_to_end_reports_clean_and_seed_val_ce(tmp_path):
    from toolkit.train.loop import train

    p = tmp_path / "a.toml"
    p.write_text(ATTRACTOR_RECIPE)
    summary = train(recipe_lib.load(p), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert all("seed_val_ce" in r and math.isfinite(r["seed_val_ce"]) for r in evals)
    assert evals[-1]["val_loss"] < math.log(259)  # below uniform over the byte vocabulary
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] and summary["step"] == 16


def test_resume_continues_exactly(tmp_path):
    """The repulsion memory is saved with the weights, so a resumed run repeats the uninterrupted one."""
    from toolkit.train.loop import train

    p = tmp_path / "a.toml"
    p.write_text(ATTRACTOR_RECIPE.replace("max_iters = 16", "max_iters = 10").replace("train_positions = 0",
                                                                                      "train_positions = 2"))
    r = recipe_lib.load(p)
    train(r, tmp_path / "straight")
    assert train(r, tmp_path / "split", stop_after=4)["stopped_early"]
    train(recipe_lib.load(tmp_path / "split" / "recipe.toml"), tmp_path / "split", resume=True)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    # 2 of the 16 positions of each row are scored: the log says so beside the tokens read
    rec = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "tokens_per_s" in r]
    assert rec and all(r["scored_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * 2 / 16) for r in rec)


# ---- the hand-written backward of the fast relaxation -----------------------------------------------------


@pytest.mark.parametrize("case", ["all_fire", "some_fire", "no_change"])
def test_hand_written_backward_equals_autograd(case, monkeypatch):
    """`Relaxation` (one autograd node, backward by hand) against autograd through the same steps, in float64:
    breaks in every group, in some groups only (and low-tension steps), and the random direction of a break
    that finds no change."""
    if case == "some_fire":
        monkeypatch.setattr(relax, "HIGH_TENSION", 0.6)  # some position groups above, some below
    x = torch.randint(0, 50, (3, 8))
    out = {}
    for hand in (True, False):
        m = (tiny(steps=3, dt=0.0) if case == "no_change" else tiny(steps=5, dt=2.0)).double()
        m.hand_backward = hand
        if case == "no_change":  # no coupling and no energy step: every break meets delta = 0
            with torch.no_grad():
                m.coupling_dt.fill_(-60.0)
        S0 = m.embed(m.windows(x).reshape(-1, 4)).detach().requires_grad_()
        torch.manual_seed(5)
        S, states, T = m.relax(S0, rows=3, keep_states=True)
        states = torch.stack(list(states))
        torch.manual_seed(6)
        loss = (torch.randn_like(states) * states).sum() + (torch.randn_like(S) * S).sum() + 3 * T.sum()
        params = [S0, m.energy_w1, m.energy_b1, m.energy_w2]
        out[hand] = [states.detach(), T.detach()] + list(torch.autograd.grad(loss, params))
    if case == "some_fire":
        assert 0 < (out[True][1].view(3, -1).amax(0) > 0.6).sum() < 8  # breaks in some of the 8 groups
    if case == "no_change":  # the break moved the unchanged state along a random direction
        assert (out[True][0][0] - S0.detach()).abs().max() > 1e-3
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


needs_c_relaxation = pytest.mark.skipif(relax.c_library() is None, reason="relax_cpu.c not built (no C compiler)")


def relaxation_with_gradients(kernel: str, case: str):
    """States, final state, tension and the gradients of S0 and the heads, fp32, through `relaxation_kernel`."""
    kw = {"all_fire": dict(steps=5, dt=2.0), "no_change": dict(steps=3, dt=0.0),
          "no_breaks": dict(steps=5, dt=2.0, breaks=False)}[case]
    m = tiny(relaxation_kernel=kernel, **kw)
    if case == "no_change":  # no coupling and no energy step: every break meets delta = 0
        with torch.no_grad():
            m.coupling_dt.fill_(-60.0)
    x = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    S0 = m.embed(m.windows(x).reshape(-1, 4)).detach().requires_grad_()
    torch.manual_seed(5)
    S, states, T = m.relax(S0, rows=3, keep_states=True)
    torch.manual_seed(6)
    loss = (torch.randn_like(states) * states).sum() + (torch.randn_like(S) * S).sum() + 3 * T.sum()
    grads = torch.autograd.grad(loss, [S0, m.energy_w1, m.energy_b1, m.energy_w2])
    return [states.detach(), S.detach(), T.detach(), *grads]


@needs_c_relaxation
@pytest.mark.parametrize("case", ["all_fire", "no_change", "no_breaks"])
def test_c_relaxation_equals_the_torch_node(case):
    """relax_cpu.c (`relaxation_kernel = "auto"` on CPU) against the torch node: the states, the tension and the
    gradients of the input and of the energy heads (second order), in fp32."""
    c_out, torch_out = relaxation_with_gradients("auto", case), relaxation_with_gradients("torch", case)
    for name, a, b in zip(["states", "final", "tension", "S0", "w1", "b1", "w2"], c_out, torch_out):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=name)
    assert case == "no_change" or c_out[4].abs().sum() > 0  # (dt = 0: the heads get no gradient)
    assert (case == "no_breaks") == (c_out[3].abs().sum() == 0)  # S0's gradient flows through the breaks only


@needs_c_relaxation
def test_c_relaxation_trains_as_the_torch_node():
    """Eight training steps of the whole trajectory loss (bf16 readouts, Adam, clipping) from the same weights and
    batches: the losses of the two kernels agree to 1e-4."""
    from toolkit.device import autocast
    from toolkit.train.loop import train_step
    from toolkit.train.optim import build_optimizers

    r = recipe_lib.load("recipes/attractor_a1.toml", ["model.steps=4", "model.dim=32", "model.max_seq_len=8"])
    losses = {}
    for kernel in ("auto", "torch"):
        torch.manual_seed(0)
        m = Model(Config(**{**r.model.__dict__, "vocab_size": 64, "relaxation_kernel": kernel}))
        m.train()
        opts = build_optimizers(m, r.train, "cpu")
        g = torch.Generator().manual_seed(1)
        losses[kernel] = []
        for i in range(8):
            x, y = torch.randint(0, 64, (16, 8), generator=g), torch.randint(0, 64, (16, 8), generator=g)
            torch.manual_seed(100 + i)
            amp = autocast(torch.device("cpu"), torch.bfloat16)
            losses[kernel].append(train_step(m, m, opts, [(x, y)], amp, 1.0).item())
    assert losses["auto"] == pytest.approx(losses["torch"], abs=1e-4)
    assert losses["auto"][-1] < losses["auto"][0]


def test_relaxation_kernel_switch(monkeypatch):
    """"torch" never calls the C node; "c" where the library was not built is one clear error."""
    def fail(*args):
        raise AssertionError("the C relaxation ran")

    monkeypatch.setattr(relax.RelaxationC, "apply", fail)
    relaxation_with_gradients("torch", "all_fire")
    monkeypatch.setattr(relax, "c_library", lambda: None)
    relaxation_with_gradients("auto", "all_fire")  # not built: the torch node
    with pytest.raises(UserError, match="relaxation_kernel = \"c\" but the C relaxation was not built"):
        relaxation_with_gradients("c", "all_fire")
    with pytest.raises(RecipeError, match="'auto', 'c', 'torch'"):
        Config(**{**TINY, "relaxation_kernel": "fast"})


def test_bf16_autocast_relaxes_in_fp32_and_reads_out_in_bf16():
    """Under bf16 autocast the relaxation stays in fp32 (its steps of ~1e-4 would vanish in bf16) and the readouts
    are autocast's bf16 linears; the weights' gradients are fp32."""
    m = tiny(loss="ce")
    m.train()
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(x, y)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert m.readout_window.weight.grad.dtype == torch.float32 and m.energy_w1.grad.abs().sum() > 0
    with torch.no_grad():
        S, _, _ = m.relax(m.embed(m.windows(x).reshape(-1, 4)), rows=2, keep_states=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expect = m.readout_window(S.reshape(16, -1) / m.temperature)
    torch.testing.assert_close(logits.detach().reshape(16, -1), expect, atol=0, rtol=0)


def test_smoothed_nll_is_cross_entropy_with_label_smoothing():
    logits = torch.randn(6, 50)
    y = torch.randint(0, 50, (6,))
    y[2] = -1
    expect = F.cross_entropy(logits, y, ignore_index=-1, label_smoothing=0.06)
    got = attractor_model.smoothed_nll(F.log_softmax(logits, -1), y)
    assert got.item() == pytest.approx(expect.item(), rel=1e-6)


def test_last_tension_of_a_zeroed_step_is_the_seeds():
    """A step whose values are non-finite is zeroed (the seed), so its waves normalise to 0, not to unit
    vectors: the tension the loss uses must come from the actual state, in the hand-written relaxation too."""
    m = tiny(breaks=False)
    m.train()
    with torch.no_grad():
        m.energy_w1.fill_(float("inf"))  # every energy step is nan, zeroed
    S0 = F.normalize(torch.randn(6, 4, 8), dim=-1).requires_grad_()
    S, _, T = m.relax(S0, rows=6, keep_states=True)
    assert S.abs().sum() == 0
    assert torch.allclose(T, relax.tension(S.detach()))  # 0.35 (1 - cos(0, 0)) = 0.35 per window


@pytest.mark.parametrize("vectorized", [True, False])
def test_the_relaxation_never_reads_values_back_from_the_device(vectorized, monkeypatch):
    """No `bool(tensor)`, `.item()`, `int()`/`float()` of a tensor in the relaxation (forward and backward): on a
    GPU, each would stall every step."""
    m = tiny(steps=3, vectorized=vectorized)
    m.train()
    S0 = m.embed(m.windows(torch.randint(0, 50, (3, 8))).reshape(-1, 4)).detach().requires_grad_()

    def read_back(self, *args):
        raise AssertionError("a value read back from the device")

    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            S, states, T = m.relax(S0, rows=3, keep_states=True)
        if grad:
            (S.sum() + torch.stack(list(states)).sum() + T.sum()).backward()
    monkeypatch.undo()
    assert S0.grad.abs().sum() > 0


def test_named_training_terms_equal_a_by_hand_computation_and_reach_metrics(tmp_path):
    """training_terms(): the clean train CE, trajectory contrast, aux CEs and final tension of the forwards since
    the last read, equal to the same quantities computed by hand on the batch; the trainer logs them."""
    import torch.nn.functional as F

    from toolkit.models.attractor import relax
    from toolkit.train.loop import train

    model = tiny(train_positions=0).train()
    x = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    model(x, x)
    terms = model.training_terms()
    assert model.training_terms() == {}  # read once, then reset
    torch.manual_seed(1)  # the same forward by hand: the same noise and permutation
    c = model.config
    ctx = model.windows(x).reshape(-1, c.window)
    logits, emb_rows, S, states, _ = model.score(ctx, 3, keep_states=True)
    T = relax.fast_tension(S.unflatten(-1, (c.n_waves, -1)).permute(2, 1, 0, 3))
    by_hand = model.trajectory_loss(states, S, T, logits, ctx, x.reshape(-1), 3, prev_emb=emb_rows[:, -1])
    assert terms["train_ce"] == pytest.approx(F.cross_entropy(logits.float(), x.reshape(-1)).item(), rel=1e-5)
    assert terms["final_tension"] == pytest.approx(T.mean().item(), rel=1e-5)
    for name in ("traj_contrast", "token_aux_ce", "readout_aux_ce"):
        assert terms[name] == pytest.approx(by_hand[name].item(), rel=1e-5), name

    p = tmp_path / "a.toml"
    p.write_text(ATTRACTOR_RECIPE)
    train(recipe_lib.load(p), tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in logged if "loss" in r]
    assert all({"train_ce", "traj_contrast", "final_tension"} <= set(r) for r in train_records)


def test_seed_format_files_have_the_seeds_columns_and_one_row_per_epoch(tmp_path, capsys):
    import csv

    from conftest import lmkit

    from toolkit.seed_formats import BOGGERS_COLUMNS

    p = tmp_path / "a.toml"
    p.write_text(ATTRACTOR_RECIPE)
    code, _, err = lmkit(capsys, "train", str(p), "-o", str(tmp_path / "run"), "--set", "train.max_iters=12")
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    steps_per_epoch = math.ceil((info["data"]["train_tokens"] - 4) / 8)  # sliding windows / batch
    code, _, err = lmkit(capsys, "eval", str(tmp_path / "run"), "--seed-format", "boggers", "-o",
                         str(tmp_path / "seed"))
    assert code == 0, err
    rows = list(csv.reader((tmp_path / "seed" / "epoch_metrics.csv").open()))
    assert rows[0] == BOGGERS_COLUMNS
    assert len(rows) - 1 == math.ceil(12 / steps_per_epoch)
    assert rows[-1][BOGGERS_COLUMNS.index("global_step")] == "12"
    assert float(rows[1][BOGGERS_COLUMNS.index("train_ce")]) > 0
    result = json.loads((tmp_path / "seed" / "eval_results.json").read_text())
    assert set(result) >= {"base", "checkpoint", "config"} and result["base"]["val_windows"] > 0
    assert result["config"]["window_size"] == 4 and result["lmkit"]["steps_per_epoch"] == steps_per_epoch
