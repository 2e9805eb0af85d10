"""Model families. Each module defines a frozen `Config` dataclass (with `family`) and `Model(config)`.

A causal model takes `(idx, targets)` and returns `(logits, loss)` (targets of -1 are ignored: masked
chat prompts); it also has `num_params()`, `flops_per_token(seq_len)` (for MFU), optionally
`new_cache(batch, max_len)` with `forward(idx, cache=, pos=)` for `toolkit.generate`,
`optimizer_groups() -> {name: [params]}` for per-group optimizer settings, and
`eval_extras(logits, targets) -> {name: sum over tokens}` for metrics of its own beside the clean CE, and
`scored_tokens(seq_len) -> int` when its training loss scores fewer positions per row than the seq_len it reads
(the trainer's progress line and metrics then add scored tokens/s beside tokens/s).

An objective other than next-token prediction (T5 span denoising) is the model's too: `make_objective(seed)`
turns the trainer's token windows into (input, target) batches and takes per-row losses back
(toolkit/data/span_corruption.py), `eval_batch(x, index)` does the same, fixed, for evaluation, and
`row_losses(logits, targets)` gives the feedback. A Config with `with_tokenizer(tok)` takes ids it needs
(pad, EOS, sentinels) from the tokenizer before the model is built.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

FAMILIES = {
    "llama": "toolkit.models.llama",
    "gpt2": "toolkit.models.gpt2",  # GPT-2 baseline and its Resonance variant
    "attractor": "toolkit.models.attractor",  # BoggersTheLLM
    "pgpt": "toolkit.models.pgpt",  # attn_demo's PGPT-Lformer
    "t5": "toolkit.models.t5",  # attn_demo's T5 span denoising on PGPT-Lformer blocks
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
