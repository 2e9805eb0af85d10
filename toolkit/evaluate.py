"""Evaluation: token-level cross-entropy, perplexity and bits per byte on fixed val windows.

Every run is evaluated on the same non-overlapping windows from the start of the val split, so
numbers from different runs and seeds compare. Bits per byte counts the UTF-8 bytes each target
token stands for, so tokenizers with different vocabularies compare too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.shards import eval_windows


@dataclass
class EvalResult:
    loss: float  # mean token-level cross-entropy, nats
    ppl: float
    bpb: float | None  # bits per UTF-8 byte
    tokens: int
    windows: int
    extras: dict = field(default_factory=dict)  # family-specific metrics, under their own names

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model, shards, split: str, seq_len: int, batch_size: int, max_batches: int, device,
             autocast_ctx=None, token_bytes: np.ndarray | None = None) -> EvalResult:
    import contextlib

    was_training = model.training
    model.eval()
    total_loss, total_tokens, total_bytes, windows = 0.0, 0, 0, 0
    # a family may report metrics of its own beside the clean CE: eval_extras(logits, targets) -> {name: sum}
    extra_fn = getattr(model, "eval_extras", None)
    extras: dict[str, float] = {}
    byte_table = torch.as_tensor(token_bytes, device=device) if token_bytes is not None else None
    for x, y in eval_windows(shards, split, seq_len, batch_size, max_batches):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast_ctx or contextlib.nullcontext():
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none",
                                 ignore_index=-1)
        valid = y >= 0  # targets masked out (-1, e.g. prompts in chat data) are not counted
        total_loss += losses.sum().item()
        total_tokens += int(valid.sum())
        windows += x.shape[0]
        if byte_table is not None:
            total_bytes += (byte_table[y.clamp(min=0)] * valid).sum().item()
        if extra_fn is not None:
            for name, value in extra_fn(logits, y).items():
                extras[name] = extras.get(name, 0.0) + float(value)
    model.train(was_training)
    loss = total_loss / total_tokens
    bpb = total_loss / (math.log(2) * total_bytes) if total_bytes else None
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50.0)), bpb=bpb, tokens=total_tokens, windows=windows,
                      extras={k: v / total_tokens for k, v in extras.items()})
