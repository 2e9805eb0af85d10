"""Optimizers with per-group settings from the recipe, and the learning-rate schedules.

Parameters fall into named groups: `embedding`, `head` (an untied classifier), `matrix` (the other
2-D weights) and `scalar` (gains, biases, per-head scalars). A model may name its own groups with
`optimizer_groups() -> {name: [params]}`. `[train.groups.NAME]` overrides lr, weight_decay, betas,
eps or the optimizer for a group; by default weight decay applies to 2-D tensors only.

`optimizer = "muon"` (torch.optim.Muon: momentum, then the update orthogonalised by Newton-Schulz) takes 2-D
tensors only, so it is meant for the `matrix` group, with AdamW for the rest (recipes/llama_fast.toml); its
`momentum` (default 0.95) and Nesterov are Keller Jordan's, and its lr is scaled by sqrt(max(1, rows / cols)).
Its Newton-Schulz iteration runs in bf16 where bf16 is native (GPUs, CPUs with AVX-512 BF16 or AMX), as torch's
does, and in fp32 on other CPUs, where bf16 matmuls are emulated (`Muon` below).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from toolkit.device import cpu_bf16_supported
from toolkit.errors import UserError
from toolkit.models.base import LanguageModel

GROUP_NAMES = ("embedding", "head", "matrix", "scalar")


def embedding_and_head_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """The ids of the embeddings' weights and of the output head's (`output` or `lm_head`); tied, they meet."""
    head = getattr(model, "output", None) or getattr(model, "lm_head", None)
    return ({id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)},
            {id(head.weight)} if isinstance(head, nn.Linear) else set())


def default_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    embedding_ids, head_ids = embedding_and_head_ids(model)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for p in model.parameters():  # shared (tied) tensors appear once
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            groups["embedding"].append(p)
        elif id(p) in head_ids:
            groups["head"].append(p)
        elif p.dim() >= 2:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return {k: v for k, v in groups.items() if v}


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The update with its singular values pushed to about 1 (Keller Jordan's quintic iteration), computed in
    `dtype`; in bf16 the same operations as torch.optim.Muon's, so the same numbers. `update` is one matrix, or a
    stack of matrices of one shape (batch, rows, cols), each orthogonalised on its own."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(-2) > update.size(-1)
    if tall:
        x = x.mT
    # spectral norm <= Frobenius norm <= 1; not in place: in fp32 `x` may be the caller's tensor (the momentum
    # buffer itself without Nesterov)
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        if x.dim() == 2:
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def newton_schulz_stacked(updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                          eps: float, dtype: torch.dtype) -> list[torch.Tensor]:
    """`newton_schulz` of each update, with the updates of one shape (a tall one counted as its transpose)
    stacked into one batch: llama_fast's 42 matrices are two shapes, so 30 batched matmuls a step instead of
    630 small ones (10-15 % less time here; the same numbers)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault((min(u.shape), max(u.shape)), []).append(i)
    out: list[torch.Tensor] = [None] * len(updates)
    for indices in by_shape.values():
        if len(indices) == 1:
            out[indices[0]] = newton_schulz(updates[indices[0]], coefficients, steps, eps, dtype)
            continue
        wide = [updates[i].mT if updates[i].size(0) > updates[i].size(1) else updates[i] for i in indices]
        stacked = newton_schulz(torch.stack([w.to(dtype) for w in wide]), coefficients, steps, eps, dtype)
        for i, x in zip(indices, stacked):
            out[i] = x.mT if updates[i].size(0) > updates[i].size(1) else x
    return out


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in `ns_dtype` and batched over same-shaped matrices:
    torch's is fixed to bf16, which a CPU without native bf16 emulates (llama_fast's 42 matrices: 13 s a step in
    bf16 on an AVX2 CPU, 0.55 s in fp32), and runs one matrix at a time."""

    def __init__(self, params, lr: float, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, lr=lr, adjust_lr_fn="original", **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            updates = []
            for grad, buffer in zip(grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buffer, momentum) if group["nesterov"] else buffer)
            updates = newton_schulz_stacked(updates, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                            self.ns_dtype)
            for p, update in zip(params, updates):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))  # torch's "original" scale
        return loss


def muon_ns_dtype(device_type: str) -> torch.dtype:
    """bf16 as torch.optim.Muon has it, but for a CPU without native bf16."""
    if device_type == "cpu":
        return torch.bfloat16 if cpu_bf16_supported() else torch.float32
    return torch.bfloat16


def _make(kind: str, groups: list[dict], device_type: str):
    if kind == "adam8bit":  # attn_demo's bitsandbytes Adam8bit: on CUDA when installed, else fp32 Adam
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None and device_type == "cuda":
            return bnb.optim.Adam8bit(groups, lr=groups[0]["lr"])
        from toolkit.console import info

        info("adam8bit: bitsandbytes needs CUDA and the bitsandbytes package; using fp32 Adam")
        kind = "adam"
    if kind == "muon":
        return Muon(groups, lr=groups[0]["lr"], ns_dtype=muon_ns_dtype(device_type))
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    try:  # one fused kernel per step where available (CUDA, and CPU in recent torch)
        return cls(groups, lr=groups[0]["lr"], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, lr=groups[0]["lr"], foreach=device_type == "cuda")


def build_optimizers(model: nn.Module, cfg, device_type: str) -> list[torch.optim.Optimizer]:
    """One optimizer per optimizer kind in use; each param group remembers its `base_lr`."""
    named = (model.optimizer_groups() if isinstance(model, LanguageModel) else None) or default_groups(model)
    unknown = set(cfg.groups) - set(named)
    absent = sorted(unknown & set(GROUP_NAMES))  # a standard group this model has no parameters in
    if absent:  # e.g. "head" with tie_embeddings = true: the head's weight is the embedding's
        from toolkit.console import info

        embedding_ids, head_ids = embedding_and_head_ids(model)
        head_tied = bool(head_ids & embedding_ids)
        for name in absent:
            tied = " (its head is tied to the embedding: it trains in the embedding group)" if name == "head" and head_tied else ""
            info(f"[train.groups.{name}] is not used: this model has no {name} parameters of its own{tied}")
    unknown -= set(absent)
    if unknown:
        raise UserError(f"[train.groups]: no parameter group {sorted(unknown)[0]!r} in this model "
                        f"(groups: {', '.join(named)})")
    by_kind: dict[str, list[dict]] = {}
    for name, params in named.items():
        o = cfg.groups.get(name, {})
        decay = o.get("weight_decay", cfg.weight_decay if params[0].dim() >= 2 else 0.0)
        kind = o.get("optimizer", cfg.optimizer)
        group = {"params": params, "name": name, "lr": o.get("lr", cfg.lr), "base_lr": o.get("lr", cfg.lr),
                 "weight_decay": decay}
        if kind == "muon":
            if any(p.dim() != 2 for p in params):
                raise UserError(f"[train.groups.{name}] optimizer = \"muon\" takes 2-D weights only; the {name} group "
                                f"has tensors of shape {sorted({tuple(p.shape) for p in params if p.dim() != 2})[0]}")
            group["momentum"] = o.get("momentum", 0.95)
        elif kind != "sgd":
            group["betas"] = (o.get("beta1", cfg.beta1), o.get("beta2", cfg.beta2))
            group["eps"] = o.get("eps", cfg.eps)
        by_kind.setdefault(kind, []).append(group)
    return [_make(kind, groups, device_type) for kind, groups in by_kind.items()]


def lr_factor(step: int, cfg, done: float | None = None) -> float:
    """The schedule's multiplier of each group's base lr at `step` (0-based), floored at min_lr / lr. A budgeted
    run (train.max_minutes / max_tokens) passes `done`, the fraction of its budget used: after the warm-up steps,
    cosine and asr then run on that fraction instead of step / max_iters, so the lr reaches its floor as the budget
    ends (asr decays over the last decay_fraction of the budget). With warmup_fraction the warm-up is that first
    fraction of `done` instead of warmup_iters steps (a linear ramp from 0), and cosine runs on the rest."""
    floor = cfg.min_lr / cfg.lr
    warmup, total = cfg.warmup_iters, cfg.max_iters
    if done is not None and cfg.warmup_fraction:
        if done < cfg.warmup_fraction:
            return max(0.0, done) / cfg.warmup_fraction
        if cfg.schedule == "cosine":
            done = (done - cfg.warmup_fraction) / (1.0 - cfg.warmup_fraction)
    elif step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":  # StepLR: x gamma every step_size steps (warm-up steps count)
        return max(floor, cfg.gamma ** (step // cfg.step_size))
    if cfg.schedule == "cosine":
        if done is not None:
            progress = min(1.0, max(0.0, done))
        else:
            span = total - warmup
            if span <= 0:  # max_iters <= warmup: the whole run is warm-up (llama2.c divides by zero here)
                return 1.0
            progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # asr: attack (warmup), sustain, release (linear decay over the last decay_iters steps, or the last
    # decay_fraction of a budget)
    if done is not None:
        start = 1.0 - cfg.decay_fraction
        return 1.0 if done < start else 1.0 + (floor - 1.0) * min(1.0, (done - start) / max(cfg.decay_fraction, 1e-9))
    release_start = max(warmup, total - cfg.decay_iters)
    if step < release_start or cfg.decay_iters == 0:
        return 1.0
    progress = min(1.0, (step - release_start + 1) / max(1, total - release_start))
    return 1.0 + (floor - 1.0) * progress


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
