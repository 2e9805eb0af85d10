"""The attractor's objective is the seed's (BoggersTheLLM sandbox.py, A1 flags): every term lmkit computes on a
fixed small batch with fixed weights equals the seed's formula, written out again here in plain torch from the
seed's code (its `trajectory_contrastive_loss_and_logits`, `_aux_ce_loss_batch`, `mean_cross_entropy_eval` and
the training loop's readout aux CE), sharing nothing with the model's loss code. Gradients too.

The random numbers (the contrast's permutation, the shaping noise, the extra noise of sharp windows) are drawn
in lmkit's order and passed to the seed's formulas, which take them as inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit import recipe as recipe_lib
from toolkit.models.attractor import Config, Model, relax
from toolkit.train.optim import build_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")

B, W, D, H, V, K = 6, 4, 8, 2, 50, 4  # windows (one per row: train_positions = 1), window, dim, waves, vocab, steps
TINY = dict(vocab_size=V, window=W, dim=D, n_waves=H, steps=K, max_seq_len=W, train_positions=1, energy_rows=B)


def tiny(**kw) -> Model:
    torch.manual_seed(0)
    m = Model(Config(**{**TINY, **kw}))
    with torch.no_grad():  # sharper logits, so that some windows fall below the entropy floor
        m.readout_window.weight.mul_(1.5)
    return m.train()


def batch():
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, V, (B, W), generator=g)
    idx[0, -3:] = idx[0, -1]  # the last token three times: the seed's penalties do not add up
    idx[1, -2] = idx[1, -1]  # the previous token twice
    idx[2, -3] = idx[2, -1]
    return idx, torch.randint(0, V, (B, W), generator=g)


# ---- the seed's formulas (plain torch, from sandbox.py; names as there) -------------------------------------------


def seed_tension(S):
    """compute_tension_window (geometry only, WINDOW_TENSION_USE_ENTROPY = False), per window (B,)."""
    delta = S[:, 1:] - S[:, :-1]
    cos = F.cosine_similarity(S[:, 1:], S[:, :-1], dim=-1)
    return delta.pow(2).mean(dim=(1, 2)) + 0.35 * (1.0 - cos).mean(dim=1)


def seed_floor(T):
    """ENTROPY_FLOOR 2.0 x (1 + 0.5 (1 - sigmoid(8 (T - 0.12)))): the loss term, and the aux CE's entropy floor."""
    return 2.0 * (1.0 + 0.5 * (1.0 - torch.sigmoid(8.0 * (T - 0.12))))


def seed_energy_rows(m, S):
    """_window_energy_per_batch_row: per window, the mean over positions of the sum over waves of head_i(wave_i)."""
    waves = S.reshape(S.shape[0], S.shape[1], H, D // H)
    e = 0
    for i in range(H):
        hidden = torch.tanh(waves[:, :, i] @ m.energy_w1[i].t() + m.energy_b1[i])
        e = e + hidden @ m.energy_w2[i] + m.energy_b2[i]
    return e.mean(dim=1)


def seed_shape(logits, ctx, E):
    """The bigram bias and the repeat penalties as the seed writes them: `lo[rows, prev] -= 2.0` then
    `lo[rows, last3] -= 1.0` (advanced-index assignment: a token twice among the last 3 still gets -1 once)."""
    rows = torch.arange(ctx.shape[0])
    prev = ctx[:, -1]
    lo = logits + 0.025 * torch.matmul(E[prev], E.T)
    lo = lo.clone()
    lo[rows, prev] -= 2.0
    last = ctx[:, -3:]
    lo[rows.unsqueeze(1).expand(-1, 3).reshape(-1), last.reshape(-1)] -= 1.0
    return lo


def seed_core(states, perm):
    """trajectory_contrastive_loss on (pred = states[k], teacher = states[k+1] detached), all pairs pooled."""
    Sk = torch.stack(states)
    a = F.normalize(Sk[:-1].reshape(-1, W * D), dim=-1)
    b = F.normalize(Sk[1:].detach().reshape(-1, W * D), dim=-1)
    pos = (a * b).sum(-1)
    neg = (a * b[perm]).sum(-1)
    return F.relu(0.2 - pos + neg).mean()


def seed_aux_ce(logits, ctx, y, E, T_detached, noise, floor_noise):
    """_aux_ce_loss_batch; `noise` (N, V) ~ N(0, 1) is TRAIN_LOGIT_NOISE's draw, `floor_noise` (N, V) the
    ENTROPY_FLOOR_NOISE draw (used on the rows below the floor only)."""
    lo = seed_shape(logits, ctx, E) + 0.005 * noise
    probs_floor = F.softmax(lo, dim=-1)
    ent_s = -(probs_floor * torch.log(probs_floor + 1e-9)).sum(dim=-1)
    need = ent_s < seed_floor(T_detached)
    lo_for_ce = lo + torch.where(need.unsqueeze(-1), floor_noise * 0.12, torch.zeros_like(lo))
    probs_for_entropy = torch.where(need.unsqueeze(-1), F.softmax(lo_for_ce, dim=-1), probs_floor)
    ce = F.cross_entropy(lo_for_ce, y, label_smoothing=0.06, reduction="none")
    entropy = -(probs_for_entropy * torch.log(probs_for_entropy + 1e-8)).sum(dim=-1)
    return (ce - 0.03 * entropy).mean(), need, ent_s


def seed_objective(m, states, S, logits, ctx, y, prev_fast_states, perm, noise, sharp_noise=None):
    """The seed's A1 training loss of one batch and its terms."""
    t = {}
    t["traj_contrast"] = seed_core(states, perm)
    T = seed_tension(S).mean()
    t["floor"] = seed_floor(T)
    fast_state = S[:, -1, :].mean(dim=0)
    if prev_fast_states:
        cos = torch.cosine_similarity(fast_state.unsqueeze(0), torch.stack(prev_fast_states), dim=-1)
        t["repulsion"] = -0.08 * torch.mean(cos)  # subtracted in the seed: loss_traj + floor - repulsion
    else:
        t["repulsion"] = torch.zeros(())
    t["energy_reg"] = 0.001 * (seed_energy_rows(m, S) ** 2).mean()
    temp = F.softplus(m.temperature_raw)
    floor_noise = torch.zeros(len(y), V)
    _, need, ent = seed_aux_ce(logits, ctx, y, m.embedder.weight, T.detach(), noise, floor_noise)
    if sharp_noise is None:  # (a first pass: which windows are below the floor, to draw their noise)
        return None, need, ent, T
    floor_noise[need] = sharp_noise
    t["token_aux_ce"], _, _ = seed_aux_ce(logits, ctx, y, m.embedder.weight, T.detach(), noise, floor_noise)
    single = m.readout(S[:, -1, :]) / temp
    t["readout_aux_ce"] = F.cross_entropy(single, y, label_smoothing=0.06)
    t["loss"] = (t["traj_contrast"] + t["floor"] + t["repulsion"] + t["energy_reg"] + 0.15 * t["readout_aux_ce"]
                 + 0.2 * t["token_aux_ce"])
    return t, need, ent, T


# ---- lmkit against them ----------------------------------------------------------------------------------------


def run_both(m, fill_memory=3):
    """lmkit's training loss (forward) of one batch, and what the seed's formulas need to recompute it: the same
    relaxation (replayed with the same random directions), the repulsion's earlier batches, and the contrast's
    permutation and the shaping noise as lmkit draws them. The model's repulsion memory is left as it was before
    the forward (for a replay of lmkit's terms)."""
    prev = []
    torch.manual_seed(5)
    for _ in range(fill_memory):  # earlier training batches: the repulsion's memory
        S_prev = F.normalize(torch.randn(B, W, D), dim=-1)
        m.repulsion(S_prev)
        prev.append(S_prev[:, -1, :].mean(0))
    memory, count = m.memory.clone(), m.memory_count.clone()
    idx, tgt = batch()
    torch.manual_seed(9)
    _, loss = m(idx, tgt)
    m.memory.copy_(memory)
    m.memory_count.copy_(count)
    torch.manual_seed(9)  # the same draws: the relaxation's random directions, then the loss's numbers
    ctx = idx  # one row = one window (max_seq_len = W, train_positions = 1)
    y = tgt[:, -1]
    logits, _, S, states, _ = m.score(ctx, B, keep_states=True)
    perm = torch.rand((K - 1) * B).argsort()
    noise = torch.randn(B, V)
    return m, loss, (list(states), S, logits, ctx, y, prev, perm, noise)


def test_every_term_is_the_seeds_formula():
    m, loss, (states, S, logits, ctx, y, prev, perm, noise) = run_both(tiny())
    # which windows the seed gives the extra noise (drawn after the shaping noise, for those rows only)
    _, need, ent, T = seed_objective(m, states, S, logits, ctx, y, prev, perm, noise)
    sharp_noise = torch.randn(int(need.sum()), V)
    seed, need, ent, T = seed_objective(m, states, S, logits, ctx, y, prev, perm, noise, sharp_noise)
    # the batch exercises the rule: some windows below the seed's floor, and some that only the seed's floor
    # (about 2.2 nats) catches, not lmkit's earlier 1.0 x (1 + T) (about 1.25)
    assert 0 < int(need.sum()) < B
    assert bool(((ent < seed_floor(T)) & (ent >= 1.0 * (1 + T))).any())
    # lmkit's terms, replayed: the same relaxation, permutation and noises (the loss's tension: the final state's)
    torch.manual_seed(9)
    logits2, emb_rows, S2, states2, _ = m.score(ctx, B, keep_states=True)
    terms = m.trajectory_loss(states2, S2, relax.tension(S2), logits2, ctx, y, B, prev_emb=emb_rows[:, -1])
    for name in ("traj_contrast", "floor", "repulsion", "energy_reg", "token_aux_ce", "readout_aux_ce", "loss"):
        assert terms[name].item() == pytest.approx(seed[name].item(), rel=1e-5, abs=1e-7), name
    assert seed["repulsion"].item() != 0.0
    assert loss.item() == pytest.approx(seed["loss"].item(), rel=1e-5)


def test_the_gradient_is_the_seeds():
    """The same loss, differentiated: lmkit's forward (hand-written relaxation backward) against the seed's
    formulas through the same relaxation (autograd). This includes a quirk of the seed's `lo[rows, last3] -= 1`:
    a token that occurs twice among the last 3 gets -1 once but its logit's gradient twice (rows 0-2 here)."""
    m = tiny()
    params = [p for p in m.parameters() if p.requires_grad]
    m, loss, (states, S, logits, ctx, y, prev, perm, noise) = run_both(m)
    _, need, *_ = seed_objective(m, states, S, logits, ctx, y, prev, perm, noise)
    seed, *_ = seed_objective(m, states, S, logits, ctx, y, prev, perm, noise, torch.randn(int(need.sum()), V))
    g_lmkit = torch.autograd.grad(loss, params, allow_unused=True)
    g_seed = torch.autograd.grad(seed["loss"], params, allow_unused=True)
    for a, b in zip(g_lmkit, g_seed):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_seed_val_ce_is_the_seeds_eval():
    """mean_cross_entropy_eval: temperature-scaled logits + bigram bias - 2 on prev - 1 on each distinct one of the
    last 3 tokens, CE with label smoothing 0.06, summed (no noise)."""
    m = tiny().eval()
    idx, tgt = batch()
    with torch.no_grad():
        logits, extras = m.eval_forward(idx, tgt)
        last = logits[:, -1]  # the full windows
        expect = F.cross_entropy(seed_shape(logits.reshape(-1, V), m.windows(idx).reshape(-1, W), m.embedder.weight),
                                 tgt.reshape(-1), label_smoothing=0.06, reduction="sum")
        shaped = seed_shape(last, idx, m.embedder.weight)
        e = m.embedder.weight[idx[0, -1]]
    assert extras["seed_val_ce"] == pytest.approx(expect.item(), rel=1e-5)
    # the last token, three times among the last 3: -2 and -1 once, not -2 - 3
    assert (shaped - last)[0, idx[0, -1]].item() == pytest.approx(0.025 * (e @ e).item() - 3.0, abs=1e-4)


def test_repulsion_pools_the_last_position():
    m = tiny()
    S1, S2 = (F.normalize(torch.randn(B, W, D), dim=-1) for _ in range(2))
    m.repulsion(S1)
    cos = torch.cosine_similarity(S2[:, -1, :].mean(0), S1[:, -1, :].mean(0), dim=0)
    assert m.repulsion(S2).item() == pytest.approx(cos.item(), rel=1e-6)


def test_a_checkpoint_from_before_the_seed_pooling_loads_and_resumes_the_seeds_way(tmp_path):
    """The memory keeps mean final windows (W * D) under either pooling: a run saved with the whole-window pooling
    loads (same shapes; `toolkit.run` checks them), and its memory's last D numbers are the seed's pooled states."""
    from toolkit.run import load_weights, save_weights

    old = tiny(repulsion_pool="window")
    S1, S2 = (F.normalize(torch.randn(B, W, D), dim=-1) for _ in range(2))
    old.repulsion(S1)
    save_weights(old, tmp_path / "model.safetensors", step=1)
    m = tiny()
    load_weights(m, tmp_path / "model.safetensors")
    cos = torch.cosine_similarity(S2[:, -1, :].mean(0), S1[:, -1, :].mean(0), dim=0)
    assert m.repulsion(S2).item() == pytest.approx(cos.item(), rel=1e-6)


def test_the_a1_recipes_decay_every_parameter_as_the_seeds_adam():
    """The seed's Adam(model.parameters(), weight_decay=1e-5) decays the temperature and the biases too."""
    for name in ("attractor_a1", "attractor_a1c"):
        r = recipe_lib.load(name, ["model.vocab_size=64"])
        m = Model(r.model)
        (opt,) = build_optimizers(m, r.train, "cpu")
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        for pname, p in m.named_parameters():
            assert decay[id(p)] == 1e-5, pname
