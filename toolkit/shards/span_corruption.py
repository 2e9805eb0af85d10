"""T5 span corruption (attn_demo's T5BatchProcessor), vectorised per batch, and its adaptive curriculum.

Masking, per row of a batch of token windows (B, T):
  1. target count n = max(1, floor(T * mask_rate));
  2. repeat while a row has fewer than n masked tokens: pick a random unmasked position (the seed walks a random
     permutation and skips masked ones: the same thing), draw span = max(1, Poisson(mean_span)) and mask
     [pos, pos + span) clipped to the end. Spans can overshoot n and adjacent spans merge, as in the seed.
The loop runs over spans, each step over the whole batch at once (about n / mean_span steps), never over tokens.

Each maximal masked run k becomes sentinel k in the encoder input; the target is, for each run, its sentinel and
the original tokens, and EOS at the end. Runs beyond the tokenizer's sentinels stay visible (seed), and so do the
last masked tokens if the target would not fit in `max_target_len`. Targets are right-padded with -1 (ignored).

The curriculum (seed: AdaptiveCurriculumSampler) keeps an EMA of the loss of each of 8 span-length buckets (bucket
i: mean span drawn from the integers in [2^i, 2^(i+1))), a target quantile of those losses that rises by 0.01 every
300 sequences in which the global EMA improved, and tilts p_base ~ 1 / loss toward buckets whose losses bring the
expected loss to the target (exponential tilting, lambda by Brent's method), mixed 9:1 with uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    bos: int
    sentinel_start: int
    n_sentinels: int


@dataclass
class Corrupted:
    inputs: np.ndarray  # (B, T) encoder input, right-padded with `pad`
    targets: np.ndarray  # (B, L) sentinel + original tokens per masked run, then EOS; -1 after
    mask: np.ndarray  # (B, T) bool: the masked positions of the original window


def span_mask(shape: tuple[int, int], mask_rate: float, mean_span: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean (B, T) mask drawn as the seed does; `mean_span` (B,) is each row's Poisson mean."""
    B, T = shape
    target = max(1, int(math.floor(T * mask_rate)))
    mask = np.zeros((B, T), dtype=bool)
    positions = np.arange(T)
    mean_span = np.broadcast_to(np.asarray(mean_span, dtype=np.float64), (B,))
    while True:
        active = mask.sum(axis=1) < target
        if not active.any():
            return mask
        score = rng.random((B, T))
        score[mask] = -1.0  # never start on a masked position
        start = score.argmax(axis=1)
        span = np.maximum(1, rng.poisson(mean_span))
        mask |= (positions >= start[:, None]) & (positions < (start + span)[:, None]) & active[:, None]


def _run_starts(mask: np.ndarray) -> np.ndarray:
    before = np.zeros_like(mask)
    before[:, 1:] = mask[:, :-1]
    return mask & ~before


def corrupt(windows: np.ndarray, mask: np.ndarray, ids: SpecialIds, max_target_len: int) -> Corrupted:
    """Apply a span mask to token windows (B, T): encoder inputs with one sentinel per masked run, and targets."""
    windows = np.asarray(windows, dtype=np.int64)
    B, T = windows.shape
    mask = mask.copy()
    starts = _run_starts(mask)
    run = np.cumsum(starts, axis=1) - 1  # run index of each masked position
    mask &= run < ids.n_sentinels  # out of sentinels: the rest stays visible (seed)
    # each masked token costs one target slot, a run start one more (its sentinel); EOS needs the last one
    cost = mask.astype(np.int64) * (1 + starts)
    mask &= np.cumsum(cost, axis=1) <= max_target_len - 1
    starts &= mask
    cost = mask.astype(np.int64) * (1 + starts)

    keep = ~mask | starts
    enc_tokens = np.where(starts, ids.sentinel_start + run, windows)
    inputs = np.full((B, T), ids.pad, dtype=np.int64)
    r, c = np.nonzero(keep)
    inputs[r, (np.cumsum(keep, axis=1) - 1)[r, c]] = enc_tokens[r, c]

    lengths = cost.sum(axis=1) + 1
    L = int(lengths.max())
    targets = np.full((B, L), -1, dtype=np.int64)
    slot = np.cumsum(cost, axis=1) - 1  # where each masked token goes; its run's sentinel goes just before
    r, c = np.nonzero(mask)
    targets[r, slot[r, c]] = windows[r, c]
    r, c = np.nonzero(starts)
    targets[r, slot[r, c] - 1] = ids.sentinel_start + run[r, c]
    targets[np.arange(B), lengths - 1] = ids.eos
    return Corrupted(inputs, targets, mask)


def target_spans(target, ids: SpecialIds) -> dict[int, list[int]]:
    """{sentinel id: its tokens} of a target (or a generated one), up to EOS or padding."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in target:
        t = int(t)
        if t < 0 or t == ids.eos:
            break
        if ids.sentinel_start <= t < ids.sentinel_start + ids.n_sentinels:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    return spans


def reconstruct(inputs: np.ndarray, targets: np.ndarray, ids: SpecialIds) -> list[list[int]]:
    """The original windows from encoder inputs and targets (the inverse of `corrupt`; for tests and samples)."""
    out = []
    for enc, tgt in zip(inputs, targets):
        spans = target_spans(tgt, ids)
        row = []
        for t in enc:
            t = int(t)
            if t == ids.pad:
                break
            row.extend(spans.get(t, []) if ids.sentinel_start <= t < ids.sentinel_start + ids.n_sentinels else [t])
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------
# the adaptive curriculum


@dataclass(frozen=True)
class CurriculumConfig:
    buckets: int = 8
    beta: float = 0.99  # EMA decay of the per-bucket and global losses
    initial_loss: float = 5.0
    check_every: int = 300  # sequences between checks of the global EMA
    start_quantile: float = 0.25
    quantile_step: float = 0.01
    max_quantile: float = 0.9
    alpha: float = 1.0  # p_base ~ (1 / loss)^alpha
    uniform_mix: float = 0.1


class Curriculum:
    def __init__(self, cfg: CurriculumConfig = CurriculumConfig()):
        self.cfg = cfg
        self.losses = np.full(cfg.buckets, cfg.initial_loss)
        self.global_loss = cfg.initial_loss
        self.checked_loss = cfg.initial_loss  # the global EMA at the last check
        self.quantile = cfg.start_quantile
        self.updates = 0
        self.probs, self.info = self.distribution()

    def mean_spans(self, buckets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Each sequence's Poisson mean: an integer from [2^b, 2^(b+1)) for its bucket b."""
        return rng.integers(2 ** buckets, 2 ** (buckets + 1)).astype(np.float64)

    def distribution(self) -> tuple[np.ndarray, dict]:
        """Bucket probabilities (computed once per optimizer step) and what they came from."""
        from scipy.optimize import brentq

        c, L = self.cfg, self.losses
        log_base = -c.alpha * np.log(np.maximum(L, 1e-9))
        target = float(np.quantile(L, self.quantile))

        def tilted(lam: float) -> np.ndarray:
            logits = log_base - lam * L
            q = np.exp(logits - logits.max())
            return q / q.sum()

        expected = float(tilted(0.0) @ L)
        lam = 0.0
        if expected < target:
            gap = lambda x: float(tilted(x) @ L) - target  # noqa: E731
            lam = brentq(gap, -10.0, 0.0) if gap(-10.0) > 0 else -10.0
        probs = (1 - c.uniform_mix) * tilted(lam) + c.uniform_mix / c.buckets
        return probs, {"target": target, "expected": float(probs @ L), "lambda": lam, "quantile": self.quantile}

    def begin_step(self) -> None:
        self.probs, self.info = self.distribution()

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.cfg.buckets, size=n, p=self.probs)

    def update(self, buckets, losses) -> None:
        """One update per sequence, in order (the EMAs depend on it)."""
        b = self.cfg.beta
        for k, loss in zip(np.asarray(buckets).tolist(), np.asarray(losses, dtype=np.float64).tolist()):
            if not math.isfinite(loss):
                continue
            self.losses[k] = b * self.losses[k] + (1 - b) * loss
            self.global_loss = b * self.global_loss + (1 - b) * loss
            self.updates += 1
            if self.updates % self.cfg.check_every == 0:
                if self.global_loss < self.checked_loss:
                    self.quantile = min(self.cfg.max_quantile, self.quantile + self.cfg.quantile_step)
                self.checked_loss = self.global_loss

    def state(self) -> dict:
        return {"losses": self.losses.tolist(), "global_loss": self.global_loss, "checked_loss": self.checked_loss,
                "quantile": self.quantile, "updates": self.updates}

    def set_state(self, state: dict) -> None:
        self.losses = np.array(state["losses"], dtype=np.float64)
        self.global_loss, self.checked_loss = state["global_loss"], state["checked_loss"]
        self.quantile, self.updates = state["quantile"], state["updates"]
        self.probs, self.info = self.distribution()


# ---------------------------------------------------------------------------------------------------------
# the objective the trainer drives


class SpanCorruption:
    """Turns the trainer's token windows into (encoder input, target) batches; feeds per-sequence losses back to
    the curriculum. Randomness comes from (seed, step, micro-batch), so a resumed or DDP run draws the same spans."""

    def __init__(self, ids: SpecialIds, max_target_len: int, seed: int, mask_rate: float = 0.15,
                 mean_span: float = 3.0, curriculum: Curriculum | None = None, eval_mask_rate: float = 0.15,
                 eval_mean_span: float = 3.0):
        self.ids, self.max_target_len, self.seed = ids, max_target_len, seed
        self.mask_rate, self.mean_span = mask_rate, mean_span
        self.curriculum = curriculum
        self.eval_mask_rate, self.eval_mean_span = eval_mask_rate, eval_mean_span

    def begin_step(self) -> None:
        if self.curriculum is not None:
            self.curriculum.begin_step()

    def train_batch(self, windows: np.ndarray, step: int, micro: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(encoder inputs, targets, bucket of each row or -1)."""
        rng = np.random.default_rng([self.seed, step, micro])
        B = len(windows)
        if self.curriculum is not None:
            buckets = self.curriculum.draw(B, rng)
            spans = self.curriculum.mean_spans(buckets, rng)
        else:
            buckets, spans = np.full(B, -1), np.full(B, self.mean_span)
        mask = span_mask(windows.shape, self.mask_rate, spans, rng)
        c = corrupt(windows, mask, self.ids, self.max_target_len)
        return c.inputs, c.targets, buckets

    def eval_batch(self, windows: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Fixed corruption (the seed's validation: mask rate 0.15, mean span 3), the same for every run."""
        rng = np.random.default_rng([1234, index])
        mask = span_mask(windows.shape, self.eval_mask_rate, np.full(len(windows), self.eval_mean_span), rng)
        c = corrupt(windows, mask, self.ids, self.max_target_len)
        return c.inputs, c.targets

    def update(self, buckets: np.ndarray, row_losses: np.ndarray) -> None:
        if self.curriculum is not None:
            self.curriculum.update(buckets, row_losses)

    def state(self) -> dict:
        return {"curriculum": self.curriculum.state() if self.curriculum is not None else None}

    def set_state(self, state: dict) -> None:
        if self.curriculum is not None and state.get("curriculum"):
            self.curriculum.set_state(state["curriculum"])

    def metrics(self) -> dict:
        if self.curriculum is None:
            return {}
        info = self.curriculum.info
        return {"crclm_target": info["target"], "crclm_expected": info["expected"], "crclm_lambda": info["lambda"],
                "crclm_dist": [round(float(p), 4) for p in self.curriculum.probs]}

    def status(self) -> str:
        """The seed's log suffix: | crclm: Tgt_L Exp_L lambda Dist:[p0 ... p7]."""
        if self.curriculum is None:
            return ""
        info = self.curriculum.info
        dist = " ".join(f"{p:.2f}" for p in self.curriculum.probs)
        return f" | crclm: {info['target']:.3f} {info['expected']:.3f} {info['lambda']:.2f} [{dist}]"


def special_ids(config) -> SpecialIds:
    """The ids span corruption needs, from a model config that has them (T5, after `with_tokenizer`)."""
    c = config
    return SpecialIds(c.pad_id, c.eos_id, c.bos_id, c.sentinel_start, c.n_sentinels)


def objective_for(config, seed: int) -> SpanCorruption:
    """The span-corruption objective a model config asks for (T5: its special ids, target length, span settings
    and curriculum switch)."""
    c = config
    curriculum = Curriculum(CurriculumConfig(buckets=c.curriculum_buckets, check_every=c.curriculum_check_every)) \
        if c.curriculum else None
    return SpanCorruption(special_ids(c), c.target_len, seed, c.mask_rate, c.mean_span, curriculum)


def eval_batch(config, windows: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Val windows -> (encoder input, target) with the seed's fixed validation corruption (no curriculum)."""
    return SpanCorruption(special_ids(config), config.target_len, seed=0).eval_batch(windows, index)


class SpanCorruptionSampler:
    """A batch sampler whose windows come out span-corrupted: (encoder input, target) pairs.

    It wraps the trainer's sampler (draw / read / state like BatchSampler). `feedback(row_losses)` after each
    optimizer step hands the curriculum each row's loss; under DDP the rows of every rank are gathered first, so
    the curriculum is the same on all ranks. Micro-batch i of a step is corrupted with randomness from
    (seed, step, i), so a resumed or DDP run draws the same spans.
    """

    def __init__(self, base, objective: SpanCorruption, grad_accum: int):
        self.base, self.objective, self.grad_accum = base, objective, grad_accum
        self.draws = 0  # micro-batches drawn so far, on every rank
        self.key = (0, 0)  # (step, micro-batch) of the last draw
        self.buckets: list[np.ndarray] = []  # curriculum bucket of each row this rank read since the last feedback

    def draw(self):
        self.key = divmod(self.draws, self.grad_accum)
        self.draws += 1
        return self.base.draw()

    def read(self, which, offsets):
        windows, _ = self.base.read(which, offsets)
        x, y, buckets = self.objective.train_batch(windows, *self.key)
        self.buckets.append(buckets)
        return x, y

    def feedback(self, row_losses: list) -> None:
        """This rank's per-row losses (one tensor per micro-batch it read, in order) -> the curriculum."""
        import torch

        losses = torch.stack(row_losses).float()  # (micro-batches of this rank, B)
        buckets = torch.from_numpy(np.stack(self.buckets)).to(losses.device)
        self.buckets = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            parts = [torch.empty_like(losses) for _ in range(world)]
            torch.distributed.all_gather(parts, losses.contiguous())
            bucket_parts = [torch.empty_like(buckets) for _ in range(world)]
            torch.distributed.all_gather(bucket_parts, buckets.contiguous())
            # rank r read micro-batches r, r + world, ...: interleave back to 0, 1, 2, ...
            losses = torch.stack(parts, dim=1).flatten(0, 1)
            buckets = torch.stack(bucket_parts, dim=1).flatten(0, 1)
        self.objective.update(buckets.cpu().numpy().reshape(-1), losses.cpu().numpy().reshape(-1))
        self.objective.begin_step()

    def state(self) -> dict:
        return {"windows": self.base.state(), "objective": self.objective.state(), "draws": self.draws}

    def set_state(self, state: dict) -> None:
        self.base.set_state(state["windows"])
        self.objective.set_state(state["objective"])
        self.draws = state["draws"]

    def metrics(self) -> dict:
        return self.objective.metrics()

    def status(self) -> str:
        return self.objective.status()
