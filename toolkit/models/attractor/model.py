"""The attractor's model: its Config, the Model (embedding, readouts, forward, evaluation) and the loss terms.
The relaxation itself is in `relax.py`; docs/attractor.md and seeds.md section 1 describe both."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import toolkit.models.attractor.relax as relax
from toolkit.errors import check, check_choice
from toolkit.models.base import LanguageModel

# the seed's constants (seeds.md 1.2); the relaxation's are in relax.py
CORE_MARGIN = 0.2
FLOOR_WEIGHT, FLOOR_SHARPNESS, FLOOR_REF = 2.0, 8.0, 0.12  # the seed's ENTROPY_FLOOR is FLOOR_WEIGHT
ENTROPY_FLOORS = ("seed", "lmkit")
REPULSION_POOLS = ("last", "window")
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
    # the token aux CE gives a window's shaped logits extra noise when their entropy is below this floor (nats):
    # "seed" = the seed's 2 (1 + 0.5 (1 - sigmoid(8 (T - 0.12)))), T the batch's mean final tension (about 2.2);
    # a number f: f (1 + T), lmkit's earlier reading ("lmkit" = 1.0, about 1.25 nats)
    entropy_floor: float | str = "seed"
    repulsion_pool: str = "last"  # the repulsion's batch summary: the mean of the last position's final state (the
    #                               seed), or "window": the mean final window (lmkit's earlier reading)
    stack_repeat_penalties: bool = False  # the shaping's -1 on the last 3 context tokens: once per distinct token (the
    #                                       seed), or, True, once per occurrence (lmkit's earlier reading)
    per_sample_energy: bool = False  # True: grad E per window (dt / W), independent of the batch
    energy_rows: int = 0  # rows the batch-mean energy divides by; 0 = the call's rows (the seed: B=1 generation
    #                       relaxes 64x harder than B=64 training); 64 = relax alike in training, eval, generation
    backprop_through_relaxation: bool = False  # True: no detach between steps (coupling scalars train)
    repulsion_sign: float = -1.0  # -1 = the seed (subtracted: attraction); +1 = a real repulsion
    normalize_states: bool = True  # per-wave L2 normalisation after each step
    breaks: bool = True  # low/high-tension directional breaks
    vectorized: bool = True  # False: the seed's autograd.grad + per-wave/per-position loops (slow reference)
    compile_relaxation: bool = False  # torch.compile the outer step alone (one graph reused by every step)
    relaxation_kernel: str = "auto"  # CPU training: "auto" = the C relaxation (relax_cpu.c) where it was built,
    #                                  "c" = that or an error, "torch" = the torch node (the numbers before it)
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
        check(self.entropy_floor in ENTROPY_FLOORS if isinstance(self.entropy_floor, str) else self.entropy_floor >= 0,
              "entropy_floor", '"seed", "lmkit" or a number of nats >= 0')
        check_choice(self.repulsion_pool, "repulsion_pool", REPULSION_POOLS)
        check_choice(self.relaxation_kernel, "relaxation_kernel", ("auto", "c", "torch"))
        check(self.sample_top_k >= 0 and self.sample_temperature >= 0, "sample_top_k", "values >= 0")

    @property
    def wave_dim(self) -> int:
        return self.dim // self.n_waves


def window_state(x: torch.Tensor) -> torch.Tensor:
    """Embedding rows -> S0: LayerNorm without affine parameters, then each row L2-normalised."""
    return F.normalize(F.layer_norm(x, (x.shape[-1],)), dim=-1)


def shape_logits(logits: torch.Tensor, context: torch.Tensor, emb: torch.Tensor | None,
                 stack: bool = False) -> torch.Tensor:
    """The seed's logit shaping from the window's tokens (N, W), applied in place to `logits` (N, V): plus the
    bigram bias 0.025 * E[prev] E^T (E = `emb`; None: the caller has added it), -2 on the previous token, then -1 on
    each distinct token among the last 3 context tokens (so the previous token gets -3; the seed subtracts by
    index assignment, where a repeated index counts once); `stack`: -1 per occurrence instead. Returns `logits`."""
    prev = context[:, -1]
    if emb is not None:
        logits += BIGRAM_WEIGHT * (emb[prev] @ emb.t())
    logits.scatter_add_(1, prev[:, None], torch.full_like(prev[:, None], -PREV_PENALTY, dtype=logits.dtype))
    recent = context[:, -RECENT_TOKENS:]
    penalty = torch.full_like(recent, -RECENT_PENALTY, dtype=logits.dtype)
    if stack:
        return logits.scatter_add_(1, recent, penalty)
    same = recent[:, :, None] == recent[:, None, :]  # (N, 3, 3)
    penalty = penalty.masked_fill_(same.triu(1).any(-1), 0.0)  # a token that comes again later leaves it to that one
    if not logits.requires_grad:
        return logits.scatter_add_(1, recent, penalty)
    count = same.sum(-1).to(logits.dtype)  # (N, 3): how often each entry's token occurs among the last 3
    return RecentPenalty.apply(logits, recent, penalty, (count - 1) / count)


class RecentPenalty(torch.autograd.Function):
    """logits.scatter_add_(1, recent, penalty), in place, with the seed's gradient: its `lo[rows, last3] -= 1` reads
    a repeated token's logit once per occurrence, so autograd hands that logit its gradient once per occurrence
    (`extra` (N, 3): (count - 1) / count per entry, summed over an entry's repeats)."""

    @staticmethod
    def forward(ctx, logits, recent, penalty, extra):
        ctx.save_for_backward(recent, extra)
        ctx.mark_dirty(logits)
        return logits.scatter_add_(1, recent, penalty)

    @staticmethod
    def backward(ctx, g):
        recent, extra = ctx.saved_tensors
        return g.scatter_add(1, recent, g.gather(1, recent) * extra), None, None, None


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
    hand_backward = True  # train with `relax.Relaxation` where it applies (False: autograd through `fast_step`)

    def __init__(self, config: Config):
        super().__init__()
        self._term_sums: dict[str, torch.Tensor] = {}  # training_terms: sums since the last read
        self._term_count = 0
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
        # the repulsion term's memory: the mean final window of the last 8 training batches, (W * D) each, whatever
        # `repulsion_pool` (its last D numbers are the mean last-position state); saved with the weights, so that a
        # resumed run continues exactly
        self.register_buffer("memory", torch.zeros(REPULSION_MEMORY, c.window * c.dim))
        self.register_buffer("memory_count", torch.zeros((), dtype=torch.long))
        self._compiled_step = None  # `compile_relaxation`: relax.fast_step compiled on first use

    # ---- pieces -------------------------------------------------------------------------------------------

    @property
    def temperature(self) -> torch.Tensor:
        return F.softplus(self.temperature_raw)

    def coupling_params(self) -> tuple[torch.Tensor, ...]:
        """(gamma, scale, dt, asym) of the positional coupling, after softplus where the seed applies it."""
        sp = F.softplus
        return sp(self.coupling_gamma), sp(self.coupling_scale), sp(self.coupling_dt), self.coupling_asym

    def coupling(self) -> torch.Tensor:
        return relax.coupling_matrix(*self.coupling_params(), self.config.window)

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

    def relax(self, S: torch.Tensor, rows: int, keep_states: bool) -> tuple[torch.Tensor, list, torch.Tensor]:
        """Run the outer loop on S0 (N, W, D), `rows` windows per scored position. Returns the final state
        (N, W, D), the post-step states (if asked: a (K, N, W, D) tensor, or a list of K (N, W, D) states on the
        seed-style path) and the per-window tension of the final step (N,)."""
        c = self.config
        step = c.dt * self.energy_scale(rows)
        if not c.vectorized:
            heads = (self.energy_w1, self.energy_b1, self.energy_w2, self.energy_b2)
            return relax.relax_seed_style(S, self.coupling_params(), heads, c, rows, step, keep_states)
        step_fn = relax.fast_step
        if c.compile_relaxation and not torch.compiler.is_compiling():
            if self._compiled_step is None:
                self._compiled_step = torch.compile(relax.fast_step, dynamic=False)
            step_fn = self._compiled_step
        # (the energy is a mean over the window too)
        return relax.relax_fast(S, self.energy_w1, self.energy_b1, self.energy_w2, self.coupling(), c, rows,
                                step / c.window, keep_states, self.hand_backward, step_fn)

    # ---- forward ------------------------------------------------------------------------------------------

    def score(self, ctx: torch.Tensor, rows: int, keep_states: bool = False):
        """Embed, relax and read out the windows `ctx` (N, W), `rows` per scored position. Returns the logits
        (N, V), the embedding rows (N, W, D), the final state, the post-step states (if asked) and the final
        tension."""
        emb_rows = self.embedder(ctx)  # (N, W, D); the last row is also the bigram bias's E[prev]
        with torch.autocast(ctx.device.type, enabled=False):  # steps of ~1e-4 vanish in bf16: relax in fp32
            S, states, T_final = self.relax(window_state(emb_rows).float(), rows, keep_states)
        # (dividing the readout's input by the temperature: 8x fewer numbers than its logits; under autocast the
        # readout runs in its dtype, and measured no slower than with kept low-precision copies of the weights)
        logits = self.readout_window(S.reshape(S.shape[0], -1) / self.temperature)
        return logits, emb_rows, S, states, T_final

    def forward(self, idx, targets=None):
        c = self.config
        B, T = idx.shape
        P = min(c.train_positions, T) if (self.training and targets is not None and c.train_positions) else T
        ctx = self.windows(idx)[:, T - P :].reshape(B * P, c.window)
        trajectory = targets is not None and c.loss == "trajectory"
        logits, emb_rows, S, states, _ = self.score(ctx, B, keep_states=trajectory)
        if targets is None:
            return logits.view(B, P, -1), None
        y = targets[:, T - P :].reshape(-1)
        if c.loss == "ce":
            loss = F.cross_entropy(logits.float(), y, ignore_index=-1)
            logged = {"train_ce": loss}
        else:
            # the loss's tension is the final state's (after the last step's break), as the seed computes it
            T = relax.fast_tension(S.unflatten(-1, (c.n_waves, -1)).permute(2, 1, 0, 3))  # (relax.tension, faster)
            terms = self.trajectory_loss(states, S, T, logits, ctx, y, B, prev_emb=emb_rows[:, -1])
            loss = terms["loss"]
            logged = {"train_ce": None, "final_tension": T.mean(),
                      **{k: terms[k] for k in ("traj_contrast", "token_aux_ce", "readout_aux_ce")}}
        if self.training:
            self.log_terms(logged, logits, y)
        return logits.view(B, P, -1), loss

    def log_terms(self, logged: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add this step's named terms to sums kept on the device (read by `training_terms`, no host sync).
        `train_ce` is the clean cross-entropy of the readout on the training windows (the seed's train_CE)."""
        with torch.no_grad():
            if logged["train_ce"] is None:
                logged["train_ce"] = F.cross_entropy(logits.detach().float(), y, ignore_index=-1)
            for name, value in logged.items():
                value = value.detach().float()
                self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
        self._term_count += 1

    def training_terms(self) -> dict[str, float]:
        """Each term's mean over the training forwards since the last call: clean train CE, trajectory contrast,
        token and readout aux CE, the final state's mean tension (the seed's CSV columns where it has them)."""
        if not self._term_count:
            return {}
        out = {name: float(total) / self._term_count for name, total in self._term_sums.items()}
        self._term_sums, self._term_count = {}, 0
        return out

    def trajectory_loss(self, states, S, T_final, logits, ctx, y, rows, prev_emb=None) -> dict:
        """The seed's training objective and its terms (names as in its CSV where it has one). `T_final`: the
        tension of each final window (N,); `prev_emb`: E[prev], the embedding of each window's last token, when
        the caller has it (one embedding lookup and one gradient scatter fewer)."""
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
        bigram = F.linear(prev_emb * BIGRAM_WEIGHT, emb).float()  # a new tensor: shaped in place
        shaped = shape_logits(bigram.add_(logits), ctx, None, c.stack_repeat_penalties)
        shaped = shaped.add_(torch.empty_like(shaped).normal_(0, SHAPING_NOISE))
        logp = F.log_softmax(shaped, dim=-1)
        entropy = entropy_of(logp)
        low = entropy < self.entropy_threshold(t_mean.detach())
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
        last = self.readout(S[:, -1] / self.temperature)
        terms["readout_aux_ce"] = smoothed_ce(last, y)
        terms["loss"] = (terms["traj_contrast"] + terms["floor"] + terms["repulsion"] + terms["energy_reg"]
                         + c.token_aux_ce * terms["token_aux_ce"] + c.readout_aux * terms["readout_aux_ce"])
        return terms

    def entropy_threshold(self, t_mean: torch.Tensor) -> torch.Tensor:
        """The entropy (nats) below which a window's shaped logits get the extra noise, from the mean tension."""
        f = self.config.entropy_floor
        if f == "seed":  # the seed's ENTROPY_FLOOR, tension-scaled as its loss's floor term
            return FLOOR_WEIGHT * (1 + 0.5 * (1 - torch.sigmoid(FLOOR_SHARPNESS * (t_mean - FLOOR_REF))))
        return (1.0 if f == "lmkit" else f) * (1 + t_mean)

    def repulsion(self, S: torch.Tensor) -> torch.Tensor:
        """Mean cosine between this batch's pooled final state (`repulsion_pool`: the mean over the windows of the
        last position's state, as the seed, or of the whole window) and those of the last 8 training batches; the
        batch's mean window joins the memory (training only)."""
        window = S.mean(0).flatten()  # (W * D); its last D numbers are the mean last-position state
        last = self.config.repulsion_pool == "last"
        m = window[-S.shape[-1]:] if last else window
        memory = self.memory[:, -S.shape[-1]:] if last else self.memory
        n = int(self.memory_count.clamp(max=REPULSION_MEMORY)) if not torch.compiler.is_compiling() else None
        if n is None:  # under torch.compile: weight the unfilled slots out instead of slicing
            valid = (torch.arange(REPULSION_MEMORY, device=m.device) < self.memory_count).float()
            cos = F.cosine_similarity(memory, m[None], dim=-1)
            out = (cos * valid).sum() / valid.sum().clamp_min(1)
        else:
            out = F.cosine_similarity(memory[:n], m[None], dim=-1).mean() if n else m.sum() * 0
        if self.training:
            with torch.no_grad():
                self.memory.copy_(torch.roll(self.memory, 1, 0))
                self.memory[0] = window.detach()
                self.memory_count += 1
        return out

    # ---- metrics and the model contract -------------------------------------------------------------------

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Logits (B, T, V) for every position, and the seed's val_ce summed over the tokens (`seed_val_ce`)."""
        B, T = x.shape
        ctx = self.windows(x).reshape(B * T, self.config.window)
        logits, *_ = self.score(ctx, B)
        return logits.view(B, T, -1), {"seed_val_ce": self.seed_val_ce(logits, ctx, y.reshape(-1)).item()}

    def seed_val_ce(self, logits: torch.Tensor, ctx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The seed's val_ce of the windows `ctx` (N, W) summed over `targets` (N,): the logits (N, V) plus the
        bigram bias and the -2/-1 repeat penalties, CE with label smoothing 0.06 (no noise), in fp32."""
        with torch.autocast(ctx.device.type, enabled=False):
            shaped = shape_logits(logits.to(torch.float32, copy=True), ctx, self.embedder.weight,
                                  self.config.stack_repeat_penalties)
            return smoothed_ce(shaped, targets, reduction="sum")

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
