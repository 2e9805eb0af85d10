"""The attractor family (BoggersTheLLM): an attention-free window model relaxed by energy descent.

A window of the last W tokens is embedded (embedding, LayerNorm without affine, L2-normalised rows),
relaxed for `steps` outer steps (positional coupling, S <- S - dt * grad E with per-wave energy MLPs,
per-wave normalisation, tension-triggered directional breaks) and read out by one Linear over the
flattened window, divided by a learned temperature. See docs/attractor.md and seeds.md section 1.

Token stream mapping: `forward(idx (B, T))` scores every position t with the window of tokens t-W+1..t
(left-padded with the row's first token where t < W-1). In training with `train_positions = P > 0`
only the last P positions of each row are scored and the returned logits are (B, P, V); evaluation and
generation always get (B, T, V). The seed trains one full window per row: `train_positions = 1`.
The seed's batch-wide rules (the energy mean, the break decisions) act on the B windows at one position,
so a position's logits depend only on its own window (and generation at B = 1 is the seed's).

Faithful by default (the seed as its code runs, seeds.md 1.2):
- each energy step starts from a detached copy of the coupled state, so gradient crosses outer steps
  only through the break term (`backprop_through_relaxation = true` keeps the whole graph);
- the energy is a mean over the batch rows and the W positions, so the step per position is
  dt / (B * W) and depends on the batch (`per_sample_energy = true`: dt / W);
- the "repulsion" term is subtracted, which attracts (`repulsion_sign = 1` makes it repel).
grad E is computed in closed form (no autograd.grad, no graph rebuilt per step) on a (waves, positions,
windows, wave dim) state, and training with the seed's switches runs the whole loop as one autograd node
with a hand-written backward (`Relaxation`); `vectorized = false` runs the seed's way (autograd.grad with
create_graph, a loop over waves and positions) as a reference. Both share the readouts and loss terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.errors import check, check_choice
from toolkit.models.base import LanguageModel

# the seed's constants (seeds.md 1.2)
NORM_CLAMP = (1e-3, 12.0)  # per-wave norm clamp after an energy step
TENSION_COS_WEIGHT = 0.35
LOW_TENSION, LOW_TENSION_STEPS, HIGH_TENSION = 0.08, 4, 0.18
BREAK_ALPHA, BREAK_REF = 0.1, 0.12
CORE_MARGIN = 0.2
FLOOR_WEIGHT, FLOOR_SHARPNESS, FLOOR_REF = 2.0, 8.0, 0.12
REPULSION_WEIGHT, REPULSION_MEMORY = 0.08, 8
ENERGY_REG = 0.001
LABEL_SMOOTHING, ENTROPY_WEIGHT, BIGRAM_WEIGHT = 0.06, 0.03, 0.025
PREV_PENALTY, RECENT_PENALTY, RECENT_TOKENS = 2.0, 1.0, 3
SHAPING_NOISE, LOW_ENTROPY_NOISE = 0.005, 0.12


def inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@dataclass(frozen=True)
class Config:
    family: ClassVar[str] = "attractor"
    vocab_size: int = 0  # 0 = the tokenizer's
    window: int = 8  # W: tokens per window
    dim: int = 128  # D: state_dim
    n_waves: int = 4  # H: each wave is a contiguous D/H slice
    steps: int = 32  # outer relaxation steps (max_window_steps)
    dt: float = 0.09  # energy step size
    max_seq_len: int = 64  # rows the trainer draws / evaluate scores / generate passes (>= window)
    train_positions: int = 1  # positions scored per training row, from the end; 0 = all (the seed: 1)
    loss: str = "trajectory"  # trajectory (the seed's objective) | ce (plain token CE)
    token_aux_ce: float = 0.2  # weight of the shaped, smoothed token CE in the trajectory loss
    readout_aux: float = 0.15  # weight of the single-state readout CE
    entropy_floor: float = 1.0  # nats, times (1 + mean tension): below it the shaped logits get extra noise
    per_sample_energy: bool = False  # True: grad E per window (dt / W), independent of the batch
    energy_rows: int = 0  # rows the batch-mean energy divides by; 0 = the call's rows (the seed: B=1 generation
    #                       relaxes 64x harder than B=64 training); 64 = relax alike in training, eval, generation
    backprop_through_relaxation: bool = False  # True: no detach between steps (coupling scalars train)
    repulsion_sign: float = -1.0  # -1 = the seed (subtracted: attraction); +1 = a real repulsion
    normalize_states: bool = True  # per-wave L2 normalisation after each step
    breaks: bool = True  # low/high-tension directional breaks
    vectorized: bool = True  # False: the seed's autograd.grad + per-wave/per-position loops (slow reference)
    compile_relaxation: bool = False  # torch.compile the outer step alone (one graph reused by every step)
    # sampling defaults of the seed's generate (for chat/generate; see docs/attractor.md)
    sample_top_k: int = 28
    sample_temperature: float = 1.02
    repeat_penalty: float = 1.35  # subtracted from the logits of the last 4 generated ids
    repeat_last_n: int = 4
    last_token_penalty: float = 5.0  # subtracted again from the very last id

    def __post_init__(self):
        check(self.vocab_size >= 0, "vocab_size", "0 (the tokenizer's) or a positive size")
        check(self.window >= 2, "window", f"at least 2 tokens, got {self.window}")
        check(self.dim > 0 and self.n_waves > 0, "dim", "positive dim and n_waves")
        check(self.dim % self.n_waves == 0, "n_waves", f"a divisor of dim={self.dim}, got {self.n_waves}")
        check(self.steps >= 1, "steps", "at least 1 relaxation step")
        check(self.dt >= 0, "dt", "a step size >= 0")
        check(self.energy_rows >= 0, "energy_rows", "0 (the call's batch rows) or a positive row count")
        check(self.max_seq_len >= self.window, "max_seq_len", f"at least window={self.window}")
        check(0 <= self.train_positions <= self.max_seq_len, "train_positions", "between 0 (all) and max_seq_len")
        check_choice(self.loss, "loss", ("trajectory", "ce"))
        check(self.loss == "ce" or self.steps >= 2, "steps", "at least 2 for the trajectory loss")
        check(self.repulsion_sign in (-1.0, 0.0, 1.0), "repulsion_sign", "-1 (the seed), 0 (off) or 1")
        check(self.sample_top_k >= 0 and self.sample_temperature >= 0, "sample_top_k", "values >= 0")

    @property
    def wave_dim(self) -> int:
        return self.dim // self.n_waves


def coupling_matrix(gamma, scale, dt, asym, W: int) -> torch.Tensor:
    """M with S <- M S applying S_i += dt*scale*sum_{j != i} w_ij (S_j - S_i) to all i at once;
    w_ij = exp(-gamma |i-j|) * max(0.2, 1 + 1.25 tanh(a) sign(j-i))."""
    pos = torch.arange(W, device=gamma.device)
    offset = (pos[None, :] - pos[:, None]).to(gamma.dtype)  # j - i
    w = torch.exp(-gamma * offset.abs()) * torch.clamp(1 + 1.25 * torch.tanh(asym) * torch.sign(offset), min=0.2)
    w = w * (1 - torch.eye(W, device=w.device, dtype=w.dtype))
    return torch.eye(W, device=w.device, dtype=w.dtype) + dt * scale * (w - torch.diag(w.sum(1)))


def window_state(x: torch.Tensor) -> torch.Tensor:
    """Embedding rows -> S0: LayerNorm without affine parameters, then each row L2-normalised."""
    return F.normalize(F.layer_norm(x, (x.shape[-1],)), dim=-1)


def wave_normalize(S: torch.Tensor, H: int) -> torch.Tensor:
    """L2-normalise each (row, position, wave) slice: each position's norm becomes sqrt(H)."""
    return F.normalize(S.unflatten(-1, (H, -1)), dim=-1).flatten(-2)


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


class LowCopy:
    """What `CastLinear` keeps for one weight: memory for its low-precision copy and gradient and, on CPU, for
    its fp32 gradient."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        self.low = torch.empty_like(w, dtype=dtype)
        self.low_grad = torch.empty_like(w, dtype=dtype)
        self.grad_storage = None


class CastLinear(torch.autograd.Function):
    """x @ w.t() in the autocast dtype, numerically autocast's linear, without fresh memory for the large
    tensors at every step: autocast casts the 8.4 M-weight readout into a new bf16 copy, and autograd returns
    its gradient in new fp32 memory that the trainer frees after the step. On CPU fresh memory costs a page
    fault per 4 KB (about 16 ms for the 32 MB gradient, several times the matmul), so the bf16 copy (written
    at every call: fused optimizers do not bump the weights' version counters), the bf16 gradient and, on
    CPU, the fp32 gradient's memory are kept in `LowCopy` and reused. The fp32 gradient is handed to
    autograd in the kept memory only when the weight has no .grad (so accumulation over micro-batches adds
    to it as usual); a .grad kept past the next backward would see it overwritten."""

    @staticmethod
    def forward(ctx, x, w, copy: LowCopy):
        copy.low.copy_(w)
        x = x.to(copy.low.dtype)
        ctx.save_for_backward(x)
        ctx.w, ctx.copy = w, copy
        return x @ copy.low.t()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        w, copy = ctx.w, ctx.copy
        g = g.to(copy.low.dtype)
        gw = None
        if ctx.needs_input_grad[1]:
            low_grad = torch.mm(g.t(), x, out=copy.low_grad)
            if w.device.type == "cpu" and w.grad is None:
                if copy.grad_storage is None:
                    copy.grad_storage = torch.empty_like(w).untyped_storage()
                gw = w.new_empty(0).set_(copy.grad_storage, 0, w.shape, w.stride()).copy_(low_grad)
            else:
                gw = low_grad.to(w.dtype)
        gx = g @ copy.low if ctx.needs_input_grad[0] else None
        return gx, gw, None


def fast_heads(w1, b1, w2, step: float):
    """The energy heads folded for the fast step: with tanh(z) = 2 sigmoid(2z) - 1, 1 - tanh^2(z) = 4 s (1 - s),
    s = sigmoid(2z), and S - step * W1^T (w2 (1 - tanh^2(W1 u + b1))) is two baddbmm (sigmoid is several
    times faster than tanh on CPU)."""
    return 2 * w1.transpose(1, 2), 2 * b1[:, None], 4 * w2[:, None], w1 * -step


class Relaxation(torch.autograd.Function):
    """The fast relaxation with the seed's switches (detached steps, per-wave normalisation) as one autograd
    node. Forward: `Model._fast_step` K times on X0 (H, W, N, d), keeping its intermediates. Returns the
    post-step states (K, N, W, D), the final state (N, W, D), the last step's normalised state before its
    break (H, W, N, d), whose tension the loss uses, and whether its waves are all unit vectors. Backward, by hand: the break chain back to X0 and the
    energy heads' second-order gradients; the coupling gets none (each step starts from a detached state)."""

    @staticmethod
    def forward(ctx, X0, w1, b1, w2, M, step: float, rows: int, model):
        H, W, N, d = X0.shape
        K = model.config.steps
        heads = fast_heads(w1, b1, w2, step)
        states = X0.new_empty(K, N, W, H, d)
        low_count = X0.new_zeros(N // rows)
        X, saved = X0, []
        for k in range(K):
            keep = {}
            X, _, low_count = model._fast_step(X, M, heads, low_count, rows, False, keep)
            states[k] = X.permute(2, 1, 0, 3)
            saved.append(keep)
        ctx.saved, ctx.heads, ctx.step, ctx.M = saved, heads, step, M
        states = states.view(K, N, W, H * d)
        unit = torch.tensor(saved[-1]["finite"] is None)  # no zeroed values: every wave of the last Y is a unit
        ctx.mark_non_differentiable(unit)
        return states, states[-1].clone(), saved[-1]["Y"], unit

    @staticmethod
    def backward(ctx, g_states, g_final, g_last_Y, _):
        K = len(ctx.saved)
        H, W, N, d = ctx.saved[0]["Y"].shape
        w1t2, b1x2, w2x4, w1_step = ctx.heads
        gw1t2, gb1x2, gw2x4, gw1_step = (torch.zeros_like(t) for t in ctx.heads)

        def layout(g):  # (N, W, D) -> (H, W, N, d), contiguous
            return g.view(N, W, H, d).permute(2, 1, 0, 3).contiguous()

        G = layout(g_final) if g_final is not None else torch.zeros_like(ctx.saved[0]["Y"])
        if g_states is not None:  # (K, N, W, D) -> (K, H, W, N, d) strided views: added without a copy
            g_states = g_states.view(K, N, W, H, d).permute(0, 3, 2, 1, 4)
        for k in reversed(range(K)):
            sv = ctx.saved[k]
            if g_states is not None:
                G = G + g_states[k]
            # the break: out = where(fire, normalise(Y + coef * delta), Y), delta = Y - X_k, coef = alpha / |delta|
            G_prev = None
            if "coef" in sv:
                G_Y = None
                if sv["fire"] is not None:  # windows whose group did not break pass their gradient to Y
                    G_Y = torch.where(sv["fire"], 0.0, G)
                    G = torch.where(sv["fire"], G, 0.0)
                G_m = unit_rows_backward(G, sv["moved"], sv["n_moved"])
                delta, n, coef = sv["Y"] - sv["X"], sv["n"], sv["coef"]
                g_coef = (G_m * delta).sum(-1).sum(0)  # (W, N)
                g_n_over_n = g_coef * coef / (n * n)  # d coef / d n = -coef / n, d n / d delta = delta / n
                if sv["ok"] is not None:  # random directions (|delta| <= 1e-6) do not depend on delta
                    g_n_over_n = torch.where(n > 1e-6, g_n_over_n, 0.0)
                g_delta = torch.addcmul(G_m * coef[None, :, :, None], delta, g_n_over_n[None, :, :, None], value=-1)
                if sv["ok"] is not None:
                    g_delta = g_delta * sv["ok"]
                G = G_m + g_delta if G_Y is None else G_m + g_delta + G_Y
                G_prev = -g_delta
            if k == K - 1 and g_last_Y is not None:
                G = G + g_last_Y
            # the per-wave normalisation and the energy step Y = u + (s (1 - s) * 4 w2) @ (-step W1)
            G = unit_rows_backward(G, sv["Y"], sv["nY"])
            if sv["finite"] is not None:
                G = G * sv["finite"]
            G = G.view(H, W * N, d)
            s = sv["s"]
            u = torch.bmm(ctx.M, sv["X"].view(H, W, N * d)).view(H, W * N, d)
            q = torch.addcmul(s, s, s, value=-1)
            pre = q * w2x4
            gw1_step += torch.bmm(pre.transpose(1, 2), G)  # (bmm and add: faster than baddbmm_ here)
            G_pre = torch.bmm(G, w1_step.transpose(1, 2))
            gw2x4 += (G_pre * q).sum(1, keepdim=True)
            v = G_pre * w2x4 * q  # d/dz of s (1 - s) with s = sigmoid(z) is s (1 - s) (1 - 2 s)
            G_z = torch.addcmul(v, v, s, value=-2)
            gb1x2 += G_z.sum(1, keepdim=True)
            gw1t2 += torch.bmm(u.transpose(1, 2), G_z)
            G = G_prev if G_prev is not None else torch.zeros_like(sv["Y"])
        gw1 = 2 * gw1t2.transpose(1, 2) - ctx.step * gw1_step
        # ctx.saved holds one of this node's outputs (a reference cycle through its grad_fn): drop it now, or
        # every step's intermediates wait for Python's cyclic GC (the trainer's RSS grew to 6 GB)
        ctx.saved = ctx.heads = ctx.M = None
        return G, gw1, 2 * gb1x2[:, 0], 4 * gw2x4[:, 0], None, None, None, None


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


def shape_logits(logits: torch.Tensor, context: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
    """The seed's logit shaping from the window's tokens (N, W), applied in place to `logits` (N, V): plus the
    bigram bias 0.025 * E[prev] E^T (E = `emb`; None: the caller has added it), -2 on the previous token, -1 on
    each of the last 3 context tokens (repeats add up). Returns `logits`."""
    prev = context[:, -1]
    if emb is not None:
        logits += BIGRAM_WEIGHT * (emb[prev] @ emb.t())
    logits.scatter_add_(1, prev[:, None], torch.full_like(prev[:, None], -PREV_PENALTY, dtype=logits.dtype))
    recent = context[:, -RECENT_TOKENS:]
    return logits.scatter_add_(1, recent, torch.full_like(recent, -RECENT_PENALTY, dtype=logits.dtype))


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row from its log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


def smoothed_nll(logp, targets):
    """`smoothed_ce` from log-probabilities (the token aux CE shares one log_softmax with its entropy)."""
    valid = targets != -1
    nll = -logp.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    per_row = (1 - LABEL_SMOOTHING) * nll - LABEL_SMOOTHING * logp.mean(-1)
    return (per_row * valid).sum() / valid.sum()


def smoothed_ce(logits, targets, reduction="mean"):
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, label_smoothing=LABEL_SMOOTHING,
                           reduction=reduction)


class Model(LanguageModel):
    hand_backward = True  # train with `Relaxation` where it applies (False: autograd through `_fast_step`)

    def __init__(self, config: Config):
        super().__init__()
        assert config.vocab_size > 0, "vocab_size must be resolved before building"
        self.config = c = config
        H, d = c.n_waves, c.wave_dim
        self.embedder = nn.Embedding(c.vocab_size, c.dim)
        # the H energy heads, stacked: head_h(u) = w2_h . tanh(W1_h u + b1_h) + b2_h
        self.energy_w1 = nn.Parameter(torch.empty(H, d, d))
        self.energy_b1 = nn.Parameter(torch.zeros(H, d))
        self.energy_w2 = nn.Parameter(torch.empty(H, d))
        self.energy_b2 = nn.Parameter(torch.zeros(H))
        bound1, bound2 = math.sqrt(6 / (2 * d)), math.sqrt(6 / (d + 1))  # Xavier-uniform per head
        nn.init.uniform_(self.energy_w1, -bound1, bound1)
        nn.init.uniform_(self.energy_w2, -bound2, bound2)
        self.readout_window = nn.Linear(c.window * c.dim, c.vocab_size, bias=False)
        self.readout = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.temperature_raw = nn.Parameter(torch.tensor(inv_softplus(0.12)))
        self.coupling_gamma = nn.Parameter(torch.tensor(inv_softplus(0.52)))
        self.coupling_scale = nn.Parameter(torch.tensor(inv_softplus(0.07)))
        self.coupling_dt = nn.Parameter(torch.tensor(inv_softplus(0.09)))
        self.coupling_asym = nn.Parameter(torch.tensor(0.0))
        # the repulsion term's memory: mean final state of the last 8 training batches (saved with the
        # weights, so that a resumed run continues exactly)
        self.register_buffer("memory", torch.zeros(REPULSION_MEMORY, c.window * c.dim))
        self.register_buffer("memory_count", torch.zeros((), dtype=torch.long))
        self._eval_context = None  # the windows of the last eval forward, for eval_extras

    # ---- pieces -------------------------------------------------------------------------------------------

    @property
    def temperature(self) -> torch.Tensor:
        return F.softplus(self.temperature_raw)

    def coupling(self) -> torch.Tensor:
        return coupling_matrix(F.softplus(self.coupling_gamma), F.softplus(self.coupling_scale),
                               F.softplus(self.coupling_dt), self.coupling_asym, self.config.window)

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, W): position t's window is ids t-W+1..t, left-padded with the row's first id."""
        W = self.config.window
        pad = idx[:, :1].expand(-1, W - 1)
        return torch.cat([pad, idx], dim=1).unfold(1, W, 1)

    def embed(self, ctx: torch.Tensor) -> torch.Tensor:
        return window_state(self.embedder(ctx))

    def energy_rows(self, S: torch.Tensor) -> torch.Tensor:
        """E per window (N,): mean over positions of sum over waves of head_h(wave_h)."""
        u = S.unflatten(-1, (self.config.n_waves, -1))  # (N, W, H, d)
        h = torch.tanh(torch.einsum("nwhd,hed->nwhe", u, self.energy_w1) + self.energy_b1)
        e = (h * self.energy_w2).sum(-1) + self.energy_b2
        return e.sum(-1).mean(-1)

    def energy_scale(self, rows: int) -> float:
        """grad of the seed's energy (mean over rows) is grad of the summed row energies / rows."""
        c = self.config
        return 1.0 if c.per_sample_energy else 1.0 / (c.energy_rows or rows)

    # ---- relaxation ---------------------------------------------------------------------------------------

    def relax(self, S: torch.Tensor, rows: int, keep_states: bool) -> tuple[torch.Tensor, list, torch.Tensor]:
        """Run the outer loop on S0 (N, W, D). Returns the final state (N, W, D), the post-step states (if
        asked: a (K, N, W, D) tensor, or a list of K (N, W, D) states on the reference path) and the
        per-window tension of the final step."""
        c = self.config
        if c.vectorized:
            return self._relax_fast(S, rows, keep_states)
        M = self.coupling()
        S = S.transpose(0, 1)  # (W, N, D)
        step = c.dt * self.energy_scale(rows)
        low_count = torch.zeros(S.shape[1] // rows, device=S.device)  # per group of rows (one per position)
        states = []
        for k in range(c.steps):
            S, T, low_count = self._step(S, M, step, low_count, rows, k == c.steps - 1)
            if keep_states:
                states.append(S.transpose(0, 1))
        return S.transpose(0, 1), states, T

    # ---- the fast relaxation: the state is (H, W, N, d), so that the coupling is one matmul over W and
    # the energy heads one batched matmul over H, with no copies in between ---------------------------------

    def _relax_fast(self, S, rows: int, keep_states: bool):
        c = self.config
        H, W, d = c.n_waves, c.window, c.wave_dim
        N = S.shape[0]
        X = S.view(N, W, H, d).permute(2, 1, 0, 3).contiguous()
        M = self.coupling().expand(H, W, W)
        step = c.dt * self.energy_scale(rows) / W  # the energy is a mean over the window too
        if (self.hand_backward and torch.is_grad_enabled() and c.normalize_states
                and not c.backprop_through_relaxation and not c.compile_relaxation
                and not torch.compiler.is_compiling()):
            # training with the seed's switches: the whole loop as one autograd node, hand-written backward
            states, final, last_Y, unit = Relaxation.apply(X, self.energy_w1, self.energy_b1, self.energy_w2, M,
                                                           step, rows, self)
            return final, states if keep_states else [], self._fast_tension(last_Y, unit_waves=bool(unit))
        heads = fast_heads(self.energy_w1, self.energy_b1, self.energy_w2, step)
        low_count = torch.zeros(N // rows, device=S.device)
        step_fn = self._fast_step
        if c.compile_relaxation and not torch.compiler.is_compiling():
            if not hasattr(self, "_compiled_step"):
                self._compiled_step = torch.compile(self._fast_step, dynamic=False)
            step_fn = self._compiled_step
        states = []
        for k in range(c.steps):
            X, T, low_count = step_fn(X, M, heads, low_count, rows, k == c.steps - 1)
            if keep_states:
                states.append(X.permute(2, 1, 0, 3))  # (N, W, H, d) views, copied once by the stack
        if keep_states:
            states = torch.stack(states).flatten(-2)  # (K, N, W, D)
        return X.permute(2, 1, 0, 3).reshape(N, W, c.dim), states, T

    def _fast_step(self, X, M, heads, low_count, rows: int, last: bool, keep: dict | None = None):
        """One outer step on the state X (H, W, N, d): the numbers of `_step` in fewer, larger ops. `keep`
        (a dict) receives what `Relaxation.backward` needs."""
        c = self.config
        H, W, N, d = X.shape
        compiling = torch.compiler.is_compiling()
        unit = UnitRows.apply if torch.is_grad_enabled() else unit_rows  # (no autograd node to build)
        start = X
        u = torch.bmm(M, X.view(H, W, N * d)).view(H, W * N, d)  # the coupling: (W, W) @ each wave's (W, N*d)
        if not c.backprop_through_relaxation:
            u = u.detach()
        w1t2, b1x2, w2x4, w1_step = heads
        s = torch.sigmoid(torch.baddbmm(b1x2, u, w1t2))  # sigmoid(2 (W1 u + b1)), per wave
        q = torch.addcmul(s, s, s, value=-1)  # s (1 - s) = (1 - tanh^2(W1 u + b1)) / 4
        pre = q * w2x4
        Y = torch.baddbmm(u, pre, w1_step).view(H, W, N, d)  # u - step * W1^T (w2 (1 - tanh^2))
        if keep is not None:  # (u, q, pre and delta are recomputed in the backward: less memory to touch)
            keep.update(X=start, s=s, finite=None)
        unit_waves = c.normalize_states and not compiling  # (a zeroed wave normalises to 0, not to 1)
        if compiling or not bool(torch.isfinite(Y.sum())):  # the seed zeroes non-finite values
            if keep is not None:
                keep["finite"] = torch.isfinite(Y)
            Y = torch.nan_to_num(Y, nan=0.0, posinf=0.0, neginf=0.0)
            unit_waves = False
        if c.normalize_states:
            Y, nY = unit(Y)
        else:
            Y, nY = wave_clamp(Y, 1), None
        with torch.set_grad_enabled(last and torch.is_grad_enabled()):  # the loss uses the last tension
            T = self._fast_tension(Y, unit_waves)
        if keep is not None:
            keep.update(Y=Y, nY=nY)
        if not c.breaks:
            return Y, T, low_count
        fire, alpha, low_count = break_rule(T, low_count, rows)
        if not compiling and not bool(fire.any()):
            return Y, T, low_count
        a = alpha.expand(rows, -1).reshape(-1)  # (N,): the groups' alpha, row-major
        delta = Y - start
        n = (delta * delta).sum(-1).sum(0).clamp_min(1e-30).sqrt()  # (W, N): each position's norm over D
        coef = a / n.clamp_min(1e-6)
        moved = torch.addcmul(Y, delta, coef[None, :, :, None])  # Y + alpha * delta / |delta|
        ok = None
        if compiling or bool((n <= 1e-6).any()):  # no change: a random direction
            ok = (n > 1e-6)[None, :, :, None]
            r = torch.randn(W, N, H * d, device=Y.device, dtype=Y.dtype)  # drawn as `_break` draws it
            r = F.normalize(r, dim=-1).view(W, N, H, d).permute(2, 0, 1, 3)
            moved = torch.where(ok, moved, Y + a[:, None] * r)
        n_moved = None
        if c.normalize_states:
            moved, n_moved = unit(moved)
        fire_n = None
        out = moved
        if compiling or not bool(fire.all()):
            fire_n = fire.expand(rows, -1).reshape(-1, 1)
            out = torch.where(fire_n, moved, Y)
        if keep is not None:
            keep.update(n=n, coef=coef, ok=ok, moved=moved, n_moved=n_moved, fire=fire_n)
        return out, T, low_count

    @staticmethod
    def _fast_tension(X, unit_waves: bool = False):
        """`tension` on X (H, W, N, d), from the dot products of neighbours and the squared norms:
        |a - b|^2 = |a|^2 + |b|^2 - 2 a.b. Returns (N,). `unit_waves`: every wave of X has norm 1, so
        |a|^2 = H and tension is affine in the mean dot product (the same gradient after the normalisation,
        which removes the radial part)."""
        H, W, N, d = X.shape
        # (sums over d and then H: a reduction over the dims (0, 3) at once is 2x slower on CPU)
        dot = (X[:, 1:] * X[:, :-1]).sum(-1).sum(0)  # (W-1, N)
        if unit_waves:  # mean of (2H - 2 dot) / D + 0.35 (1 - dot / H)
            D = H * d
            return dot.mean(0).mul(-(2 / D + TENSION_COS_WEIGHT / H)).add_(2 * H / D + TENSION_COS_WEIGHT)
        sq = (X * X).sum(-1).sum(0)  # (W, N)
        norm = sq.sqrt().clamp_min(1e-8)  # as F.cosine_similarity clamps each norm
        cos = dot / (norm[1:] * norm[:-1])
        dist = torch.add(sq[1:] + sq[:-1], dot, alpha=-2)  # |a - b|^2
        # mean over the W-1 pairs of |a - b|^2 / D + 0.35 (1 - cos)
        return torch.add(dist, cos, alpha=-TENSION_COS_WEIGHT * H * d).mean(0) / (H * d) + TENSION_COS_WEIGHT

    def _step(self, S, M, step: float, low_count, rows: int, last: bool):
        """One outer step of the seed-style reference (`vectorized = false`) on the state (W, N, D):
        coupling, energy descent, normalisation, tension, breaks."""
        c = self.config
        start = S
        S = self._couple_reference(S.transpose(0, 1)).transpose(0, 1)
        if not c.backprop_through_relaxation:
            S = S.detach()
        g = self._energy_grad_reference(S)
        S = S - step * g
        if torch.compiler.is_compiling() or not bool(torch.isfinite(S).all()):  # the seed zeroes non-finite
            S = torch.nan_to_num(S, nan=0.0, posinf=0.0, neginf=0.0)
        # the seed clamps each wave's norm to [1e-3, 12] and then normalises it: the clamp keeps the
        # direction, so with normalisation on it changes nothing and is skipped
        S = wave_normalize(S, c.n_waves) if c.normalize_states else wave_clamp(S, c.n_waves)
        if last:  # the loss uses the last step's tension; earlier ones only decide breaks
            T = tension(S.transpose(0, 1))
        else:
            with torch.no_grad():
                T = tension(S.transpose(0, 1))
        if c.breaks:
            S, low_count = self._break(S, start, T, low_count, rows)
        return S, T, low_count

    def _break(self, S, start, T, low_count, rows: int):
        """Low tension for 4 steps running, or any window above 0.18: move every position by alpha along its
        own direction of change this step (a random direction where that is ~0), then renormalise.
        The seed decides per batch of windows; here a batch is the `rows` windows at one scored position
        (S is (W, rows * P, D), row-major), so position t's logits never depend on other positions."""
        fire, alpha, low_count = break_rule(T, low_count, rows)
        fire, alpha = fire.repeat(rows)[:, None], alpha.repeat(rows)[:, None]  # (N, 1), broadcast over (W, N, D)
        delta = S - start
        n = delta.norm(dim=-1, keepdim=True)
        u = delta / n.clamp_min(1e-6)
        if torch.compiler.is_compiling() or bool((n <= 1e-6).any()):  # no change: a random direction
            u = torch.where(n > 1e-6, u, F.normalize(torch.randn_like(delta), dim=-1))
        moved = S + alpha * u
        if self.config.normalize_states:
            moved = wave_normalize(moved, self.config.n_waves)
        return torch.where(fire, moved, S), low_count

    def _couple_reference(self, S):
        """The coupling as the seed writes it: per wave, per position, a sum over the other positions."""
        c = self.config
        g, s, dt, a = (F.softplus(self.coupling_gamma), F.softplus(self.coupling_scale),
                       F.softplus(self.coupling_dt), self.coupling_asym)
        waves = S.unflatten(-1, (c.n_waves, -1))
        out = []
        for h in range(c.n_waves):
            x = waves[:, :, h]
            rows = []
            for i in range(c.window):
                acc = torch.zeros_like(x[:, i])
                for j in range(c.window):
                    if j != i:
                        w = torch.exp(-g * abs(i - j)) * torch.clamp(1 + 1.25 * torch.tanh(a) * math.copysign(1, j - i),
                                                                     min=0.2)
                        acc = acc + w * (x[:, j] - x[:, i])
                rows.append(x[:, i] + dt * s * acc)
            out.append(torch.stack(rows, 1))
        return torch.stack(out, 2).flatten(-2)

    def _energy_grad_reference(self, S):
        """grad of the summed row energies by autograd with create_graph, one head call per wave (the seed)."""
        c = self.config
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x = S if S.requires_grad else S.detach().requires_grad_()
            waves = x.unflatten(-1, (c.n_waves, -1))
            e = 0
            for h in range(c.n_waves):
                z = torch.tanh(waves[:, :, h] @ self.energy_w1[h].t() + self.energy_b1[h])
                e = e + (z @ self.energy_w2[h] + self.energy_b2[h])
            E = e.sum() / c.window  # the summed row energies (each a mean over the window)
            (g,) = torch.autograd.grad(E, x, create_graph=create_graph)
        return g

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.t() for the readouts and the bigram bias; under bf16/fp16 autocast through `CastLinear`: the
        same numbers as autocast's own cast, without fresh copies of the weights and their gradients."""
        kind = x.device.type
        if torch.compiler.is_compiling() or not torch.is_autocast_enabled(kind):
            return x @ w.t()
        dtype = torch.get_autocast_dtype(kind)
        copies = self.__dict__.setdefault("_low_copies", {})  # not module state: never saved or moved
        copy = copies.get(id(w))
        if copy is None or copy.low.dtype != dtype or copy.low.device != w.device or copy.low.shape != w.shape:
            copy = copies[id(w)] = LowCopy(w, dtype)
        return CastLinear.apply(x, w, copy)

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, idx, targets=None):
        c = self.config
        B, T = idx.shape
        ctx = self.windows(idx)
        P = min(c.train_positions, T) if (self.training and targets is not None and c.train_positions) else T
        ctx = ctx[:, T - P :]
        ctx = ctx.reshape(B * P, c.window)
        trajectory = targets is not None and c.loss == "trajectory"
        rows = self.embedder(ctx)  # (N, W, D); the last row is also the bigram bias's E[prev]
        with torch.autocast(idx.device.type, enabled=False):  # steps of ~1e-4 vanish in bf16: relax in fp32
            S, states, T_final = self.relax(window_state(rows).float(), B, keep_states=trajectory)
        # (dividing the readout's input by the temperature: 8x fewer numbers than its logits)
        logits = self.linear(S.reshape(S.shape[0], -1) / self.temperature, self.readout_window.weight)
        if targets is None:
            self._eval_context = ctx if not self.training else None
            return logits.view(B, P, -1), None
        y = targets[:, T - P :].reshape(-1)
        if c.loss == "ce":
            loss = F.cross_entropy(logits.float(), y, ignore_index=-1)
        else:
            loss = self.trajectory_loss(states, S, T_final, logits, ctx, y, B, prev_emb=rows[:, -1])["loss"]
        return logits.view(B, P, -1), loss

    def trajectory_loss(self, states, S, T_final, logits, ctx, y, rows, prev_emb=None) -> dict:
        """The seed's training objective and its terms (names as in its CSV where it has one). `prev_emb`:
        E[prev], the embedding of each window's last token, when the caller has it (one embedding lookup
        and one gradient scatter fewer)."""
        c = self.config
        terms = {}
        # cos(pred, teacher) - cos(pred, neg) = pred . (t - t[perm]) / |pred| with t the unit teachers: one
        # product of every state with a detached direction (zero for the last state) instead of normalising
        flat = (torch.stack(states) if isinstance(states, (list, tuple)) else states).flatten(2)  # (K, N, W*D)
        norm = flat.norm(dim=-1).clamp_min(1e-12)  # (K, N)
        if c.normalize_states:  # |S| is sqrt(W*H) for every state: its gradient (radial in each wave) is
            norm = norm.detach()  # removed by the per-wave normalisation that made S, so it is left out
        with torch.no_grad():  # direction k: unit teacher k+1 minus a permuted unit teacher; 0 for the last state
            direction = torch.empty_like(flat)
            teacher = direction[:-1].flatten(0, 1)  # ((K-1)*N, W*D)
            torch.div(flat[1:], norm[1:, :, None], out=direction[:-1])
            # a permutation from argsort(rand), not randperm: inductor's randperm-index pattern fails on this graph
            teacher -= teacher[torch.rand(teacher.shape[0], device=teacher.device).argsort()]
            direction[-1] = 0
        margin = (flat * direction).sum(-1)[:-1] / norm[:-1]
        terms["traj_contrast"] = F.relu(CORE_MARGIN - margin).mean()
        t_mean = T_final.mean()
        terms["floor"] = FLOOR_WEIGHT * (1 + 0.5 * (1 - torch.sigmoid(FLOOR_SHARPNESS * (t_mean - FLOOR_REF))))
        terms["repulsion"] = self.repulsion(S) * c.repulsion_sign * REPULSION_WEIGHT
        terms["energy_reg"] = ENERGY_REG * self.energy_rows(S).pow(2).mean()
        emb = self.embedder.weight
        prev_emb = emb[ctx[:, -1]] if prev_emb is None else prev_emb
        bigram = self.linear(prev_emb * BIGRAM_WEIGHT, emb).float()  # a new tensor: shaped in place
        shaped = shape_logits(bigram.add_(logits), ctx, None)
        shaped = shaped.add_(torch.empty_like(shaped).normal_(0, SHAPING_NOISE))
        logp = F.log_softmax(shaped, dim=-1)
        entropy = entropy_of(logp)
        low = entropy < c.entropy_floor * (1 + t_mean.detach())
        if torch.compiler.is_compiling():  # extra noise where the distribution is too sharp
            shaped = shaped + low[:, None] * LOW_ENTROPY_NOISE * torch.randn_like(shaped)
            logp = F.log_softmax(shaped, dim=-1)
            entropy = entropy_of(logp)
        elif bool(low.any()):  # the same, drawing noise for those rows only (the normals cost more than the CE)
            sharp = low.nonzero()[:, 0]
            noisy = shaped[sharp] + torch.empty(len(sharp), shaped.shape[1], device=shaped.device).normal_(
                0, LOW_ENTROPY_NOISE)
            logp_sharp = F.log_softmax(noisy, dim=-1)
            logp = logp.index_put((sharp,), logp_sharp)
            entropy = entropy.index_put((sharp,), entropy_of(logp_sharp))
        terms["token_aux_ce"] = smoothed_nll(logp, y) - ENTROPY_WEIGHT * entropy.mean()
        last = self.linear(S[:, -1] / self.temperature, self.readout.weight)
        terms["readout_aux_ce"] = smoothed_ce(last, y)
        terms["loss"] = (terms["traj_contrast"] + terms["floor"] + terms["repulsion"] + terms["energy_reg"]
                         + c.token_aux_ce * terms["token_aux_ce"] + c.readout_aux * terms["readout_aux_ce"])
        return terms

    def repulsion(self, S: torch.Tensor) -> torch.Tensor:
        """Mean cosine between this batch's mean final window and those of the last 8 training batches; the
        batch's own mean joins the memory (training only)."""
        m = S.mean(0).flatten()
        n = int(self.memory_count.clamp(max=REPULSION_MEMORY)) if not torch.compiler.is_compiling() else None
        if n is None:  # under torch.compile: weight the unfilled slots out instead of slicing
            valid = (torch.arange(REPULSION_MEMORY, device=m.device) < self.memory_count).float()
            cos = F.cosine_similarity(self.memory, m[None], dim=-1)
            out = (cos * valid).sum() / valid.sum().clamp_min(1)
        else:
            out = F.cosine_similarity(self.memory[:n], m[None], dim=-1).mean() if n else m.sum() * 0
        if self.training:
            with torch.no_grad():
                self.memory.copy_(torch.roll(self.memory, 1, 0))
                self.memory[0] = m.detach()
                self.memory_count += 1
        return out

    # ---- metrics and the model contract -------------------------------------------------------------------

    def eval_extras(self, logits, targets) -> dict:
        """The seed's val_ce: temperature-scaled logits plus the bigram bias and the -2/-1 repeat penalties,
        CE with label smoothing 0.06 (no noise). Summed over tokens; evaluate() averages per token."""
        ctx = self._eval_context
        self._eval_context = None
        flat = logits.reshape(-1, logits.shape[-1])
        if ctx is None or ctx.shape[0] != flat.shape[0]:
            return {}
        shaped = shape_logits(flat.to(torch.float32, copy=True), ctx, self.embedder.weight)
        return {"seed_val_ce": smoothed_ce(shaped, targets.reshape(-1), reduction="sum").item()}

    def sampling_defaults(self) -> dict:
        """The seed's sampler, used by `lmkit chat` unless the user sets these options."""
        c = self.config
        return {"top_k": c.sample_top_k, "temperature": c.sample_temperature, "repeat_penalty": c.repeat_penalty,
                "repeat_last_n": c.repeat_last_n, "last_token_penalty": c.last_token_penalty}


    def scored_tokens(self, seq_len: int | None = None) -> int:
        """Positions per training row of `seq_len` tokens that the loss scores (`train_positions`, A1: 1)."""
        c = self.config
        T = seq_len or c.max_seq_len
        return min(c.train_positions, T) if c.train_positions else T

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per trainer token (forward + backward): per scored window, the readouts and the
        relaxation; times the scored fraction of each row."""
        c = self.config
        T = seq_len or c.max_seq_len
        readout = 2 * c.window * c.dim * c.vocab_size + 2 * c.dim * c.vocab_size
        relax = c.steps * c.window * (4 * c.dim * c.wave_dim + 2 * c.window * c.dim)
        per_window = 3 * (readout + relax)
        scored = min(c.train_positions, T) / T if c.train_positions else 1.0
        return per_window * scored
