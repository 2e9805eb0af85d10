"""The model protocol: what the trainer, evaluator, generator, chat, serve and export ask of a model.

Every family's `Model` subclasses `LanguageModel`. `forward` and `flops_per_token` are required; every other
method has a default here, and callers use it rather than testing with `hasattr`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def count_params(module: nn.Module) -> int:
    """Parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in module.parameters())  # parameters() already yields a tied tensor once


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every nn.ModuleList whose children are all of one class and hold parameters (llama's
    `layers`, gpt2's and pgpt's `blocks`, T5's `encoder` and `decoder`); a list inside a list already taken is part
    of its block."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        children = list(module.children())
        if children and len({type(c) for c in children}) == 1 and all(any(True for _ in c.parameters())
                                                                      for c in children):
            blocks += children
            taken.append(name)
    return blocks


class LanguageModel(nn.Module):
    config: Any

    # what the training objective is: "next_token" (causal LM), or "span_corruption" (T5: the trainer wraps its
    # sampler in toolkit.shards.span_corruption, which reads the ids and span settings from `config`)
    objective = "next_token"
    # T5: the decoder is conditioned on an encoded input, `condition(enc_ids)` -> an object with new_cache/forward
    is_encoder_decoder = False

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits, loss): logits (B, T, V); loss the mean cross-entropy over targets != -1 (None without targets)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token read (for MFU)."""
        raise NotImplementedError

    def num_params(self) -> int:
        return count_params(self)

    # --- generation -------------------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None):
        """A KV cache for `forward(idx, cache=, pos=)`, or None: the model has none (generation recomputes a window)."""
        return None

    def make_decoder(self):
        """A decoder of the family's own (an object with `logits(ids)`, `max_len`, `sliding`), or None: the
        generation loop picks one from `new_cache`."""
        return None

    def make_batch_decoder(self):
        """A decoder that steps many sequences in one forward (the server's batched decoding: an object with
        `step(decoders, tokens, positions, ...)`, see toolkit/models/llama_cpu.py), or None: requests are
        interleaved one forward each."""
        return None

    def sampling_defaults(self) -> dict:
        """Sampling settings the family's seed used (chat and serve apply them unless the user sets them)."""
        return {}

    def condition(self, enc_ids: torch.Tensor):
        raise NotImplementedError(f"{type(self).__module__} is not an encoder-decoder model")

    # --- training and evaluation ------------------------------------------------------------------------------

    def sharding_units(self) -> list[nn.Module]:
        """The repeated units, in forward order, that FSDP shards (and compiles) one by one; each must be called
        through its own __call__ in forward. The default finds them from the module lists."""
        return repeated_blocks(self)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]] | None:
        """{group: params} for per-group optimizer settings, or None: toolkit.train.optim's default groups."""
        return None

    def scored_tokens(self, seq_len: int) -> int:
        """Positions per training row that the loss scores (attractor A1 scores 1 of its window)."""
        return seq_len

    def training_terms(self) -> dict[str, float]:
        """The mean of each named term of the training objective since the last call (e.g. the attractor's clean
        CE, tension, break rate). A family accumulates them on the device in forward and the trainer reads them
        once per log interval, so there is no host sync per step."""
        return {}

    @torch.no_grad()
    def row_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's mean cross-entropy over its targets != -1: the feedback a sampler may ask for (T5's curriculum)."""
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                    reduction="none").view(targets.shape)
        return per_token.sum(-1) / (targets >= 0).sum(-1).clamp(min=1)

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Eval logits for (x, y), and metrics of the family's own as {name: sum over scored tokens}."""
        logits, _ = self(x)
        return logits, {}
