"""Model families. Each module defines a frozen `Config` dataclass (with `family`) and `Model(config)`, a
`toolkit.models.base.LanguageModel`: the protocol (required and optional methods, with their defaults) is there.
Shared pieces (KV cache, RoPE tables, masks) are in `toolkit.models.common`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import threading
from dataclasses import replace
from typing import Sequence

FAMILIES = {
    "llama": "toolkit.models.llama",
    "gpt2": "toolkit.models.gpt2",  # GPT-2 baseline and its Resonance variant
    "attractor": "toolkit.models.attractor",  # BoggersTheLLM
    "pgpt": "toolkit.models.pgpt",  # attn_demo's PGPT-Lformer
    "t5": "toolkit.models.t5",  # attn_demo's T5 span denoising on PGPT-Lformer blocks
}


def module(family: str):
    return importlib.import_module(FAMILIES[family])


# families whose Config lives apart from their Model, so that a recipe of theirs loads without torch
CONFIG_MODULES = {"llama": "toolkit.models.llama_config"}


def config_class(family: str):
    return importlib.import_module(CONFIG_MODULES.get(family, FAMILIES[family])).Config


def build(config, vocab_size: int | None = None, token_strings: Sequence[str] | None = None, init: bool = True):
    """Build the model; a config with vocab_size 0 takes the tokenizer's `vocab_size`. `token_strings` (the
    text of each token id) go to the families whose Model takes them (gpt2's rhyme init); the others ignore them.
    `init=False` for a model whose every weight is loaded next (its loader checks that none is missing): the
    weights keep whatever memory they get instead of their random init (a 110 M llama's is 2.6 s of a chat's
    start-up)."""
    if getattr(config, "vocab_size", None) == 0 and vocab_size:
        config = replace(config, vocab_size=vocab_size)
    cls = module(config.family).Model
    with _BUILDING, contextlib.nullcontext() if init else _no_weight_init():
        if token_strings is not None and "token_strings" in inspect.signature(cls).parameters:
            return cls(config, token_strings=token_strings)
        return cls(config)


def has_numpy_model(config) -> bool:
    """Whether the family has a torch-free model for generation (llama: llama_cpu.NumpyLlama) that may take it."""
    return config.family == "llama" and config.standard


def numpy_model(config, tensors, vocab_size: int | None = None):
    """The torch-free model for generation (`lmkit chat` without PyTorch's import) with these numpy weights, or
    None: the family has none, or the weights are not exactly the fp32 tensors the config needs."""
    if not has_numpy_model(config):
        return None
    from toolkit.models.llama_cpu import NumpyLlama

    if getattr(config, "vocab_size", None) == 0 and vocab_size:
        config = replace(config, vocab_size=vocab_size)
    return NumpyLlama.from_tensors(config, tensors)


def cast_for_decoding(model, dtype: str):
    """The model to generate with in `dtype` (bfloat16, int8): a torch-free llama (NumpyLlama) keeps its fp32
    weights and decodes through the C step's bfloat16 or int8 copy of its matrices; a torch model is cast to
    bfloat16 (int8 is the C step's only). ValueError where the C step was not built."""
    from toolkit.models.llama_cpu import NumpyLlama, check_decode_dtype

    if isinstance(model, NumpyLlama):
        check_decode_dtype(dtype)
        model.decode_dtype = dtype
        return model
    import torch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{dtype} weights are the C decode step's, which runs llama models (this is a "
                         f"{type(model).__name__}): use float32 or bfloat16")
    return model.to(getattr(torch, dtype))


# one build at a time: `_no_weight_init` swaps torch.nn.init's fills for the whole process, so a build with init
# on another thread (a server loading a second model) would otherwise get uninitialised weights
_BUILDING = threading.Lock()
_INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
               "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_weight_init():
    """torch.nn.init's fills do nothing inside (what nn.Linear, nn.Embedding and every family's own init call)."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FILLS}
    for name in saved:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(init, name, fill)
