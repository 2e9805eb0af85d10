"""Model families. Each module defines a frozen `Config` dataclass (with `family`) and `Model(config)`.

A causal model takes `(idx, targets)` and returns `(logits, loss)` (targets of -1 are ignored: masked
chat prompts); it also has `num_params()`, `flops_per_token(seq_len)` (for MFU), optionally
`new_cache(batch, max_len)` with `forward(idx, cache=, pos=)` for `toolkit.generate`,
`optimizer_groups() -> {name: [params]}` for per-group optimizer settings, and
`eval_extras(logits, targets) -> {name: sum over tokens}` for metrics of its own beside the clean CE.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

FAMILIES = {
    "llama": "toolkit.models.llama",
    "gpt2": "toolkit.models.gpt2",  # GPT-2 baseline and its Resonance variant
    "attractor": "toolkit.models.attractor",  # BoggersTheLLM
    "pgpt": "toolkit.models.pgpt",  # attn_demo's PGPT-Lformer
}


def module(family: str):
    return importlib.import_module(FAMILIES[family])


def config_class(family: str):
    return module(family).Config


def build(config, vocab_size: int | None = None):
    """Build the model; a config with vocab_size 0 takes the tokenizer's `vocab_size`."""
    if getattr(config, "vocab_size", None) == 0 and vocab_size:
        config = replace(config, vocab_size=vocab_size)
    return module(config.family).Model(config)
