"""Model families. Each module defines a frozen `Config` dataclass (with `family`) and `Model(config)`.

A causal model takes `(idx, targets)` and returns `(logits, loss)`; it also has `num_params()`,
`flops_per_token()` (for MFU) and a KV-cache forward used by `toolkit.generate`.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

FAMILIES = {
    "llama": "toolkit.models.llama",
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
