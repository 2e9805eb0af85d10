"""The attractor's relaxation: `steps` outer steps of coupling, energy descent, per-wave normalisation,
tension and directional breaks on the embedded window states (seeds.md 1.2; docs/attractor.md).

Two ways to run it, with the same numbers:
- `relax_fast`: the state is (H, W, N, d) (waves, positions, windows, wave dim), so that the coupling is one
  batched matmul over W and the energy heads two `baddbmm` per step, with grad E in closed form; in
  training with the seed's switches the whole loop is one autograd node with a hand-written backward
  (`Relaxation`, its tape one `StepTape` per step);
- `RelaxationC`: the same node in C (relax_cpu.c, built at install), for CPU training in fp32
  (`relaxation_kernel`: "auto" takes it where it was built, "torch" keeps the node above);
- `relax_seed_style` (`vectorized = false`): the seed's way, autograd.grad with create_graph for grad E, one
  head call per wave and the coupling as a double loop over positions (the slow baseline of the benchmarks).

No step asks the device anything (no `bool(tensor)`, `.item()`): non-finite values are always zeroed,
the break applies to every window with alpha 0 (fast path) or a `torch.where` (seed style) where its group
does not fire, and the random directions a break takes where a state did not change are drawn once per
relaxation, before the first step.

Both take `c`, the family's Config (only its relaxation fields are read), and `rows`: the windows at one scored
position, the seed's batch (the N windows are row-major (rows, P)); the seed's batch-wide rules (the energy
mean, the break decisions) act per group of `rows`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from toolkit.errors import UserError
from toolkit.models.llama_cpu import NOT_BUILT

# the seed's constants (seeds.md 1.2)
NORM_CLAMP = (1e-3, 12.0)  # per-wave norm clamp after an energy step
TENSION_COS_WEIGHT = 0.35
LOW_TENSION, LOW_TENSION_STEPS, HIGH_TENSION = 0.08, 4, 0.18
BREAK_ALPHA, BREAK_REF = 0.1, 0.12
NO_CHANGE = 1e-6  # a change this small has no direction: the break takes a random one


# ---- shared pieces ---------------------------------------------------------------------------------------------


def coupling_matrix(gamma, scale, dt, asym, W: int) -> torch.Tensor:
    """M with S <- M S applying S_i += dt*scale*sum_{j != i} w_ij (S_j - S_i) to all i at once;
    w_ij = exp(-gamma |i-j|) * max(0.2, 1 + 1.25 tanh(a) sign(j-i))."""
    pos = torch.arange(W, device=gamma.device)
    offset = (pos[None, :] - pos[:, None]).to(gamma.dtype)  # j - i
    w = torch.exp(-gamma * offset.abs()) * torch.clamp(1 + 1.25 * torch.tanh(asym) * torch.sign(offset), min=0.2)
    w = w * (1 - torch.eye(W, device=w.device, dtype=w.dtype))
    return torch.eye(W, device=w.device, dtype=w.dtype) + dt * scale * (w - torch.diag(w.sum(1)))


def wave_normalize(S: torch.Tensor, H: int) -> torch.Tensor:
    """L2-normalise each (row, position, wave) slice: each position's norm becomes sqrt(H)."""
    return F.normalize(S.unflatten(-1, (H, -1)), dim=-1).flatten(-2)


def wave_clamp(S: torch.Tensor, H: int) -> torch.Tensor:
    x = S.unflatten(-1, (H, -1))
    n = x.norm(dim=-1, keepdim=True)
    return (x * (n.clamp(*NORM_CLAMP) / n.clamp_min(1e-12))).flatten(-2)


def tension(S: torch.Tensor) -> torch.Tensor:
    """Per window: mean squared step between neighbours + 0.35 * mean (1 - cos) of neighbours (N,)."""
    a, b = S[:, 1:], S[:, :-1]
    sq = (a - b).pow(2).mean(dim=(1, 2))
    cos = F.cosine_similarity(a, b, dim=-1)
    return sq + TENSION_COS_WEIGHT * (1 - cos).mean(dim=1)


def break_rule(T: torch.Tensor, low_count: torch.Tensor, rows: int):
    """The break decision per group of `rows` windows (one group per scored position; T is (rows * P,),
    row-major). Returns fire (P,), alpha (P,) and the updated low-tension counts (P,); no gradient."""
    Tg = T.detach().view(rows, -1)  # (rows, P)
    t_mean = Tg.mean(0)
    low_count = (low_count + 1) * (t_mean < LOW_TENSION)  # (few ops: each costs more than its arithmetic)
    fire = (Tg.amax(0) > HIGH_TENSION).logical_or_(low_count >= LOW_TENSION_STEPS)
    low_count = low_count * fire.logical_not()
    alpha = (BREAK_REF - t_mean).clamp_(0.1 * BREAK_REF, 2.0 * BREAK_REF).mul_(BREAK_ALPHA / BREAK_REF)
    return fire, alpha, low_count


def random_directions(W: int, N: int, D: int, device, dtype) -> torch.Tensor:
    """Unit vectors (W, N, D), one per window position: where a break finds no change to follow."""
    return F.normalize(torch.randn(W, N, D, device=device, dtype=dtype), dim=-1)


# ---- the seed-style relaxation (`vectorized = false`) -----------------------------------------------------------


def couple_loop(S, gamma, scale, dt, asym, H: int):
    """The coupling as the seed writes it on S (N, W, D): per wave, per position, a sum over the other positions."""
    W = S.shape[1]
    waves = S.unflatten(-1, (H, -1))
    out = []
    for h in range(H):
        x = waves[:, :, h]
        rows = []
        for i in range(W):
            acc = torch.zeros_like(x[:, i])
            for j in range(W):
                if j != i:
                    w = torch.exp(-gamma * abs(i - j)) * torch.clamp(1 + 1.25 * torch.tanh(asym) * math.copysign(1, j - i),
                                                                     min=0.2)
                    acc = acc + w * (x[:, j] - x[:, i])
            rows.append(x[:, i] + dt * scale * acc)
        out.append(torch.stack(rows, 1))
    return torch.stack(out, 2).flatten(-2)


def energy_grad_autograd(S, w1, b1, w2, b2, W: int):
    """grad of the summed window energies (each a mean over its W positions) on states S (..., D) by autograd,
    with create_graph when grad is on (the second-order gradients that train the heads), one head call per wave
    (the seed)."""
    H = w1.shape[0]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = S if S.requires_grad else S.detach().requires_grad_()
        waves = x.unflatten(-1, (H, -1))
        e = 0
        for h in range(H):
            z = torch.tanh(waves[..., h, :] @ w1[h].t() + b1[h])
            e = e + (z @ w2[h] + b2[h])
        E = e.sum() / W  # the summed window energies (each a mean over the window)
        (g,) = torch.autograd.grad(E, x, create_graph=create_graph)
    return g


def seed_break(S, start, T, low_count, rows: int, direction, H: int, normalize: bool):
    """The break on S (W, N, D) after a step from `start`: low tension for 4 steps running, or any window above
    0.18 in a group: every position of the group's windows moves by alpha along its own direction of change
    this step (`direction` (W, N, D), a unit vector, where that is ~0), then is renormalised per wave."""
    fire, alpha, low_count = break_rule(T, low_count, rows)
    fire, alpha = fire.repeat(rows)[:, None], alpha.repeat(rows)[:, None]  # (N, 1), broadcast over (W, N, D)
    delta = S - start
    n = delta.norm(dim=-1, keepdim=True)
    u = torch.where(n > NO_CHANGE, delta / n.clamp_min(NO_CHANGE), direction)
    moved = S + alpha * u
    if normalize:
        moved = wave_normalize(moved, H)
    return torch.where(fire, moved, S), low_count


def relax_seed_style(S, coupling_params, heads, c, rows: int, step: float, keep_states: bool):
    """The relaxation the seed's way on S0 (N, W, D). `coupling_params`: (gamma, scale, dt, asym) after softplus;
    `heads`: (w1, b1, w2, b2); `step`: dt over the rows the energy mean divides by. Returns the final state (N, W, D),
    the post-step states (a list of K (N, W, D), if asked) and the last step's tension (N,)."""
    H = c.n_waves
    N, W, D = S.shape
    direction = random_directions(W, N, D, S.device, S.dtype)
    S = S.transpose(0, 1)  # (W, N, D)
    low_count = torch.zeros(N // rows, device=S.device)  # per group of rows (one per position)
    states = []
    for k in range(c.steps):
        start = S
        S = couple_loop(S.transpose(0, 1), *coupling_params, H).transpose(0, 1)
        if not c.backprop_through_relaxation:
            S = S.detach()
        S = S - step * energy_grad_autograd(S, *heads, W)
        S = torch.nan_to_num(S, nan=0.0, posinf=0.0, neginf=0.0)  # the seed zeroes non-finite values
        # the seed clamps each wave's norm to [1e-3, 12] and then normalises it: the clamp keeps the
        # direction, so with normalisation on it changes nothing and is skipped
        S = wave_normalize(S, H) if c.normalize_states else wave_clamp(S, H)
        with torch.set_grad_enabled(k == c.steps - 1 and torch.is_grad_enabled()):  # the loss uses the last one
            T = tension(S.transpose(0, 1))
        if c.breaks:
            S, low_count = seed_break(S, start, T, low_count, rows, direction, H, c.normalize_states)
        if keep_states:
            states.append(S.transpose(0, 1))
    return S.transpose(0, 1), states, T


# ---- the fast relaxation -------------------------------------------------------------------------------------


def unit_rows_backward(g, y, n):
    """The gradient of y = x / max(|x|, 1e-12) over the last dim: (g - y (y . g)) / |x|."""
    dot = (y * g).sum(-1, keepdim=True) * (n > 1e-12)  # below the clamp, x / eps has no radial term
    return torch.addcmul(g, y, dot, value=-1) / n


def unit_rows(x):
    """(F.normalize(x, dim=-1), the clamped norm)."""
    n = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x / n, n


class UnitRows(torch.autograd.Function):
    """`unit_rows` with a 4-kernel backward (autograd's takes ~10)."""

    @staticmethod
    def forward(ctx, x):
        y, n = unit_rows(x)
        ctx.save_for_backward(y, n)
        ctx.mark_non_differentiable(n)
        return y, n

    @staticmethod
    def backward(ctx, g, _):
        return unit_rows_backward(g, *ctx.saved_tensors)


class FoldedHeads(NamedTuple):
    """The energy heads folded for the fast step. With tanh(z) = 2 sigmoid(2z) - 1, 1 - tanh^2(z) = 4 s (1 - s) for
    s = sigmoid(2z), so u - step * grad E = u - step * W1^T (w2 (1 - tanh^2(W1 u + b1))) is two baddbmm:
    s = sigmoid(u @ two_w1t + two_b1), u + (s (1 - s) * four_w2) @ minus_step_w1 (sigmoid is several times faster
    than tanh on CPU). Per wave: (H, d, d), (H, 1, d), (H, 1, d), (H, d, d)."""

    two_w1t: torch.Tensor  # 2 W1^T
    two_b1: torch.Tensor  # 2 b1
    four_w2: torch.Tensor  # 4 w2
    minus_step_w1: torch.Tensor  # -step W1

    @classmethod
    def fold(cls, w1, b1, w2, step: float) -> FoldedHeads:
        return cls(2 * w1.transpose(1, 2), 2 * b1[:, None], 4 * w2[:, None], w1 * -step)


@dataclass
class StepTape:
    """What `Relaxation.backward` keeps of one forward step (u, s (1 - s), the pre-activation and delta are
    recomputed: less memory to touch). The break's fields are None without breaks."""

    X: torch.Tensor  # the step's start state (H, W, N, d)
    s: torch.Tensor  # sigmoid(2 (W1 u + b1)) (H, W * N, d)
    zeroed: torch.Tensor  # 1.0 where the energy step was not finite and was zeroed, else 0.0 (H, W, N, d)
    Y: torch.Tensor  # the normalised state after the energy step (H, W, N, d)
    nY: torch.Tensor  # its clamped per-wave norms before the normalisation (H, W, N, 1)
    n: torch.Tensor | None = None  # |Y - X| per position (W, N)
    coef: torch.Tensor | None = None  # the break's alpha / n (W, N); 0 where it took no step along Y - X
    moved: torch.Tensor | None = None  # the normalised state after the break (H, W, N, d)
    n_moved: torch.Tensor | None = None  # its clamped per-wave norms before the normalisation (H, W, N, 1)


def unit_counts(nY: torch.Tensor) -> torch.Tensor:
    """Squared norm per position (W, N) of normalised waves whose clamped norms were `nY` (H, W, N, 1): a wave
    with norm above the clamp became a unit vector, a zeroed one stays 0."""
    return torch.sum(nY[..., 0] > 1e-12, 0, dtype=nY.dtype)


def fast_tension(X: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
    """`tension` on X (H, W, N, d), from the dot products of neighbours and the squared norms per position `sq`
    (W, N) (None: computed from X): |a - b|^2 = |a|^2 + |b|^2 - 2 a.b. Returns (N,). The normalised path
    passes `unit_counts`, which carry no gradient: the gradient they leave out is radial in each wave and
    removed by the normalisation's backward."""
    H, W, N, d = X.shape
    D = H * d
    # (sums over d and then H: a reduction over the dims (0, 3) at once is 2x slower on CPU)
    dot = (X[:, 1:] * X[:, :-1]).sum(-1).sum(0)  # (W-1, N)
    if sq is None:
        sq = (X * X).sum(-1).sum(0)  # (W, N)
    norm = sq.sqrt().clamp_min(1e-8)  # as F.cosine_similarity clamps each norm
    cos = dot / (norm[1:] * norm[:-1])
    dist = torch.add(sq[1:] + sq[:-1], dot, alpha=-2)  # |a - b|^2
    # mean over the W-1 pairs of |a - b|^2 / D + 0.35 (1 - cos)
    return torch.add(dist, cos, alpha=-TENSION_COS_WEIGHT * D).mean(0) / D + TENSION_COS_WEIGHT


def fast_step(X, M, heads: FoldedHeads, low_count, direction, rows: int, c, last: bool,
              tape: list[StepTape] | None = None):
    """One outer step on the state X (H, W, N, d): the numbers of the seed-style step in fewer, larger ops.
    `direction` (H, W, N, d): the random unit directions of `random_directions`. Returns the new state, the
    tension (N,) (with gradient on the `last` step only) and the low-tension counts. `tape` (a list) receives the
    step's `StepTape`."""
    H, W, N, d = X.shape
    unit = UnitRows.apply if torch.is_grad_enabled() else unit_rows  # (no autograd node to build)
    start = X
    u = torch.bmm(M, X.view(H, W, N * d)).view(H, W * N, d)  # the coupling: (W, W) @ each wave's (W, N*d)
    if not c.backprop_through_relaxation:
        u = u.detach()
    s = torch.sigmoid(torch.baddbmm(heads.two_b1, u, heads.two_w1t))  # sigmoid(2 (W1 u + b1)), per wave
    slope = torch.addcmul(s, s, s, value=-1) * heads.four_w2  # w2 (1 - tanh^2(W1 u + b1))
    stepped = torch.baddbmm(u, slope, heads.minus_step_w1).view(H, W, N, d)  # u - step * grad E
    Y = torch.nan_to_num(stepped, nan=0.0, posinf=0.0, neginf=0.0)  # the seed zeroes non-finite values
    if c.normalize_states:
        Y, nY = unit(Y)
        sq = unit_counts(nY)
    else:
        Y, nY, sq = wave_clamp(Y, 1), None, None
    with torch.set_grad_enabled(last and torch.is_grad_enabled()):  # the loss uses the last tension
        T = fast_tension(Y, sq)
    step_tape = None
    if tape is not None:  # (x * 0 is nan where x is not finite: a float mask, faster to apply than a bool one)
        step_tape = StepTape(X=start, s=s, zeroed=(stepped * 0).nan_to_num_(1.0), Y=Y, nY=nY)
        tape.append(step_tape)
    if not c.breaks:
        return Y, T, low_count
    # every window moves by alpha along its unit change Y - X, or along its random direction where that is ~0;
    # alpha is 0 in the groups that do not fire, where the state stays Y (normalising it again changes only
    # rounding, and its backward projects out the radial part that the normalisation's backward removes anyway)
    fire, alpha, low_count = break_rule(T, low_count, rows)
    a = (alpha * fire).expand(rows, -1).reshape(-1)  # (N,): the groups' alpha, row-major
    delta = Y - start
    n = (delta * delta).sum(-1).sum(0).clamp_min(1e-30).sqrt()  # (W, N): each position's norm over D
    changed = n > NO_CHANGE
    coef = torch.where(changed, a / n, 0.0)  # Y + alpha * delta / |delta| where the state changed
    moved = torch.addcmul(Y, delta, coef[None, :, :, None])
    moved = torch.addcmul(moved, direction, torch.where(changed, 0.0, a)[None, :, :, None])  # Y + alpha * r elsewhere
    n_moved = None
    if c.normalize_states:
        moved, n_moved = unit(moved)
    if step_tape is not None:
        step_tape.n, step_tape.coef, step_tape.moved, step_tape.n_moved = n, coef, moved, n_moved
    return moved, T, low_count


class Relaxation(torch.autograd.Function):
    """The fast relaxation with the seed's switches (detached steps, per-wave normalisation) as one autograd
    node. Forward: `fast_step` K times on X0 (H, W, N, d), keeping a `StepTape` per step. Returns the post-step
    states (K, N, W, D), the final state (N, W, D), and the last step's normalised state before its break
    (H, W, N, d) with its `unit_counts` (W, N), from which the loss's tension is computed. Backward, by hand:
    the break chain back to X0 and the energy heads' second-order gradients; the coupling gets none (each step
    starts from a detached state)."""

    @staticmethod
    def forward(ctx, X0, w1, b1, w2, M, direction, step: float, rows: int, c):
        H, W, N, d = X0.shape
        K = c.steps
        heads = FoldedHeads.fold(w1, b1, w2, step)
        states = X0.new_empty(K, N, W, H, d)
        low_count = X0.new_zeros(N // rows)
        X, tape = X0, []
        for k in range(K):
            X, _, low_count = fast_step(X, M, heads, low_count, direction, rows, c, False, tape)
            states[k] = X.permute(2, 1, 0, 3)
        ctx.tape, ctx.heads, ctx.step, ctx.M = tape, heads, step, M
        states = states.view(K, N, W, H * d)
        last_sq = unit_counts(tape[-1].nY)
        ctx.mark_non_differentiable(last_sq)
        return states, states[-1].clone(), tape[-1].Y, last_sq

    @staticmethod
    def backward(ctx, g_states, g_final, g_last_Y, _):
        tape, heads = ctx.tape, ctx.heads
        K = len(tape)
        H, W, N, d = tape[0].Y.shape
        g_two_w1t, g_two_b1, g_four_w2, g_minus_step_w1 = (torch.zeros_like(t) for t in heads)

        def layout(g):  # (N, W, D) -> (H, W, N, d), contiguous
            return g.view(N, W, H, d).permute(2, 1, 0, 3).contiguous()

        G = layout(g_final) if g_final is not None else torch.zeros_like(tape[0].Y)
        if g_states is not None:  # (K, N, W, D) -> (K, H, W, N, d) strided views: added without a copy
            g_states = g_states.view(K, N, W, H, d).permute(0, 3, 2, 1, 4)
        for k in reversed(range(K)):
            t = tape[k]
            if g_states is not None:
                G = G + g_states[k]
            # the break: out = normalise(Y + coef * delta + b * r), delta = Y - X, coef = alpha / |delta| where the
            # state changed, else 0 (b and the choice carry no gradient; where coef is 0, so is its derivative)
            G_prev = None
            if t.coef is not None:
                G_m = unit_rows_backward(G, t.moved, t.n_moved)
                delta, n, coef = t.Y - t.X, t.n, t.coef
                g_coef = (G_m * delta).sum(-1).sum(0)  # (W, N)
                g_n_over_n = g_coef * coef / (n * n)  # d coef / d n = -coef / n, d n / d delta = delta / n
                g_delta = torch.addcmul(G_m * coef[None, :, :, None], delta, g_n_over_n[None, :, :, None], value=-1)
                G = G_m + g_delta
                G_prev = -g_delta
            if k == K - 1 and g_last_Y is not None:
                G = G + g_last_Y
            # the per-wave normalisation, the zeroing and the energy step Y = u + (s (1 - s) * 4 w2) @ (-step W1)
            G = unit_rows_backward(G, t.Y, t.nY)
            G = torch.addcmul(G, G, t.zeroed, value=-1).view(H, W * N, d)  # no gradient through a zeroed value
            s = t.s
            u = torch.bmm(ctx.M, t.X.view(H, W, N * d)).view(H, W * N, d)
            q = torch.addcmul(s, s, s, value=-1)
            slope = q * heads.four_w2
            g_minus_step_w1 += torch.bmm(slope.transpose(1, 2), G)  # (bmm and add: faster than baddbmm_ here)
            G_slope = torch.bmm(G, heads.minus_step_w1.transpose(1, 2))
            g_four_w2 += (G_slope * q).sum(1, keepdim=True)
            v = G_slope * heads.four_w2 * q  # d/dz of s (1 - s) with s = sigmoid(z) is s (1 - s) (1 - 2 s)
            G_z = torch.addcmul(v, v, s, value=-2)
            g_two_b1 += G_z.sum(1, keepdim=True)
            g_two_w1t += torch.bmm(u.transpose(1, 2), G_z)
            G = G_prev if G_prev is not None else torch.zeros_like(t.Y)
        g_w1 = 2 * g_two_w1t.transpose(1, 2) - ctx.step * g_minus_step_w1
        # ctx.tape holds one of this node's outputs (a reference cycle through its grad_fn): drop it now, or
        # every step's intermediates wait for Python's cyclic GC (the trainer's RSS grew to 6 GB)
        ctx.tape = ctx.heads = ctx.M = None
        return G, g_w1, 2 * g_two_b1[:, 0], 4 * g_four_w2[:, 0], None, None, None, None, None


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """relax_cpu.c as built by setup.py, or None where it was not (no C compiler at install)."""
    spec = importlib.util.find_spec("toolkit.models.attractor._relax_cpu")
    if spec is None or not spec.origin:
        return None
    lib = ctypes.CDLL(spec.origin)
    if lib.relax_cpu_abi() != 1:
        return None  # a library from another version of relax_cpu.c: the torch node is right, if slower
    ints, ptrs = [ctypes.c_int] * 7, [ctypes.c_void_p]
    lib.relax_cpu_forward.argtypes = ints + ptrs * 18
    lib.relax_cpu_backward.argtypes = ints + ptrs * 23
    lib.relax_cpu_forward.restype = lib.relax_cpu_backward.restype = None
    return lib


def use_c_kernel(c, S: torch.Tensor) -> bool:
    """Whether `relax_fast` runs `RelaxationC`: `relaxation_kernel` "c" (an error where the library was not built)
    or "auto" (where it was), for fp32 states on the CPU."""
    if c.relaxation_kernel == "torch" or S.device.type != "cpu" or S.dtype != torch.float32:
        return False
    if c_library() is None:
        if c.relaxation_kernel == "c":
            raise UserError(f"model.relaxation_kernel = \"c\" but the C relaxation was not built: {NOT_BUILT}")
        return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class RelaxationC(torch.autograd.Function):
    """`Relaxation` in C (relax_cpu.c) on the states in the model's (N, W, D) layout: the same inputs, outputs and
    arithmetic, in two calls (forward with its tape, backward) instead of ~40 torch operations a step. Returns the
    post-step states (K, N, W, D), the final state (N, W, D), the last step's normalised state before its break
    (N, W, D) and its `unit_counts` (W, N)."""

    @staticmethod
    def forward(ctx, S0, w1, b1, w2, M, direction, step: float, rows: int, c):
        N, W, D = S0.shape
        H, d, K = c.n_waves, c.wave_dim, c.steps
        heads = FoldedHeads.fold(w1.detach(), b1.detach(), w2.detach(), step)
        folded = [t.contiguous() for t in (heads.two_w1t, heads.two_b1, heads.four_w2, heads.minus_step_w1,
                                           heads.minus_step_w1.transpose(1, 2))]
        M = M.detach().contiguous()
        S0 = S0.detach().contiguous()
        states, sg, zeroed, Y = (S0.new_empty(K, N, W, D) for _ in range(4))
        nY, n_moved = S0.new_empty(K, N, W, H), S0.new_empty(K, N, W, H)
        dn, coef = S0.new_empty(K, N, W), S0.new_empty(K, N, W)
        work = S0.new_empty(2, N)
        c_library().relax_cpu_forward(N, W, H, d, K, rows, int(c.breaks), *map(_ptr, (M, *folded, S0, direction,
                                      states, sg, zeroed, Y, nY, dn, coef, n_moved, work[0], work[1])))
        ctx.save_for_backward(S0, M, *folded, states, sg, zeroed, Y, nY, dn, coef, n_moved)
        ctx.shape, ctx.step = (N, W, H, d, K, rows, int(c.breaks)), step
        last_sq = torch.sum(nY[-1] > 1e-12, -1, dtype=S0.dtype).t()  # (W, N), as `unit_counts`
        ctx.mark_non_differentiable(last_sq)
        return states, states[-1].clone(), Y[-1], last_sq

    @staticmethod
    def backward(ctx, g_states, g_final, g_last_Y, _):
        S0, M, *folded, states, sg, zeroed, Y, nY, dn, coef, n_moved = ctx.saved_tensors
        N, W, H, d, K, rows, breaks = ctx.shape
        grads = [t.contiguous() if t is not None else None for t in (g_states, g_final, g_last_Y)]
        gX0 = torch.empty_like(S0)
        g_heads = [torch.zeros_like(t) for t in folded[:4]]  # two_w1t, two_b1, four_w2, minus_step_w1
        c_library().relax_cpu_backward(N, W, H, d, K, rows, breaks, *map(_ptr, (M, *folded, S0, states, sg, zeroed,
                                       Y, nY, dn, coef, n_moved, *grads, gX0, *g_heads)))
        g_two_w1t, g_two_b1, g_four_w2, g_minus_step_w1 = g_heads
        g_w1 = 2 * g_two_w1t.transpose(1, 2) - ctx.step * g_minus_step_w1
        return gX0, g_w1, 2 * g_two_b1[:, 0], 4 * g_four_w2[:, 0], None, None, None, None, None


def relax_fast(S, w1, b1, w2, M, c, rows: int, step: float, keep_states: bool, hand_backward: bool = True,
               step_fn=fast_step):
    """The fast relaxation of S0 (N, W, D) with the coupling matrix M (W, W) and the energy heads (w1, b1, w2);
    `step`: dt over the rows the energy mean divides by and over W. Returns what `relax_seed_style` returns, the
    states as a (K, N, W, D) tensor. In training with the seed's switches (and `hand_backward`) the loop is the
    `Relaxation` node; otherwise `step_fn` (`fast_step` or a compiled one) runs under autograd or no_grad."""
    H, W, d = c.n_waves, c.window, c.wave_dim
    N = S.shape[0]
    hand = (hand_backward and torch.is_grad_enabled() and c.normalize_states and not c.backprop_through_relaxation
            and step_fn is fast_step and not torch.compiler.is_compiling())  # (dynamo does not trace the node)
    if hand and use_c_kernel(c, S):
        direction = random_directions(W, N, H * d, S.device, S.dtype).transpose(0, 1).contiguous()  # (N, W, D)
        states, final, last_Y, last_sq = RelaxationC.apply(S.contiguous(), w1, b1, w2, M, direction, step, rows, c)
        T = fast_tension(last_Y.view(N, W, H, d).permute(2, 1, 0, 3), last_sq)
        return final, states if keep_states else [], T
    X = S.view(N, W, H, d).permute(2, 1, 0, 3).contiguous()
    M = M.expand(H, W, W)
    direction = random_directions(W, N, H * d, S.device, S.dtype).view(W, N, H, d).permute(2, 0, 1, 3).contiguous()
    if hand:
        states, final, last_Y, last_sq = Relaxation.apply(X, w1, b1, w2, M, direction, step, rows, c)
        return final, states if keep_states else [], fast_tension(last_Y, last_sq)
    heads = FoldedHeads.fold(w1, b1, w2, step)
    low_count = torch.zeros(N // rows, device=S.device)
    states = []
    for k in range(c.steps):
        X, T, low_count = step_fn(X, M, heads, low_count, direction, rows, c, k == c.steps - 1)
        if keep_states:
            states.append(X.permute(2, 1, 0, 3))  # (N, W, H, d) views, copied once by the stack
    if keep_states:
        states = torch.stack(states).flatten(-2)  # (K, N, W, D)
    return X.permute(2, 1, 0, 3).reshape(N, W, c.dim), states, T
