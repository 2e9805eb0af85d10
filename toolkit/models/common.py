"""Pieces more than one family uses: the KV cache, RoPE tables, causal masks, attention, and the cached decoder.

Each family keeps its own way of applying rotary (llama: interleaved pairs as run.c; pgpt/t5: half-split), but
the angle tables are the same.
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.models.decoding import PrefixCacheDecoder

# ---------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per-layer keys and values, each (batch, heads, max_len, head_dim), for `forward(idx, cache=, pos=)`.

    `extra` holds what a family keeps per position besides (gpt2: the resonance features of every cached token;
    pgpt/t5: attention-II's running sum of k_B), by name.
    """

    def __init__(self, n_layers: int, batch: int, heads: int, head_dim: int, max_len: int, device, dtype,
                 **extra: Any):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.extra = extra

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, H, T, dh) at positions pos..pos+T-1; return those of 0..pos+T-1."""
        end = pos + k.shape[2]
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ---------------------------------------------------------------------------------------------------------
# RoPE


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim / 2): position p, frequency i turns by p * theta^(-2i / head_dim)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------------------------------------------------
# masks


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """Boolean (tq, tk) mask of visible keys for the last tq of tk positions (the first tk - tq are in a KV cache):
    query i, at position tk - tq + i, sees keys 0..tk - tq + i."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A boolean mask as an additive float one (the default float dtype, or `dtype`): 0 where allowed, -inf
    elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def causal_sdpa_args(tq: int, tk: int, device=None) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention, causal queries being the last tq of tk keys:
    SDPA's own causal flag for a whole sequence, nothing for one new token (it sees every key), and a boolean
    mask for a chunk after cached tokens."""
    if tq == tk:
        return None, tq > 1
    if tq == 1:
        return None, False
    return causal_mask(tq, tk, device), False


# ---------------------------------------------------------------------------------------------------------
# attention


def matmul_attention(q, k, v, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """scaled_dot_product_attention as two batched matmuls around a softmax (q, k, v: (B, H, T, D)), all in
    q's dtype: under bf16 autocast the scores are bf16 (softmax accumulates in fp32 inside), as in nanoGPT's
    attention without flash.

    On CPU, at the short sequences small models train on, this is about twice as fast as torch's
    flash-attention kernel, whose backward is a fifth of a bf16 step of the 288/6/6 shape (docs/train.md), at
    the cost of holding each head's (T, T) probabilities for the backward. `attn_mask` is boolean (True =
    visible), as SDPA's; `is_causal` with fewer queries than keys means the last queries (causal_mask), where
    SDPA's means the first (the callers pass it for whole sequences only, causal_sdpa_args).
    """
    if is_causal:
        attn_mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:  # added, not masked_fill: an add's backward is free, masked_fill's is a copy
        scores = scores + additive_mask(attn_mask, scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return probs @ v


# `auto` keeps SDPA past this many keys: the gain shrinks with length (2.6x at 256, 1.1x at 2,048, bf16) while
# the (T, T) probabilities kept for the backward grow with it, B x H x T^2 x 2 bytes a layer
MATMUL_ATTENTION_MAX_KEYS = 1024


def attention(q, k, v, attn_mask: torch.Tensor | None, is_causal: bool, dropout_p: float, impl: str):
    """The attention of a block by `impl` (a model's `attention` setting): sdpa (torch's fused kernels), matmul
    (matmul_attention), or auto: matmul for bf16 on CPU up to MATMUL_ATTENTION_MAX_KEYS keys, where it is faster
    than the flash kernel (benchmarks/attention.py), sdpa elsewhere (fp32 on CPU, where the flash kernel is
    faster; GPUs; longer sequences)."""
    if impl == "matmul" or (impl == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16
                            and k.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS):
        return matmul_attention(q, k, v, attn_mask, is_causal, dropout_p)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                            dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------------------
# the cached decoder


class CachedDecoder(PrefixCacheDecoder):
    """Next-token logits from a model with a KV cache (`new_cache`, `forward(idx, cache=, pos=)`) of max_seq_len
    positions; a prompt prefix already in the cache is reused (toolkit.models.decoding)."""

    def __init__(self, model):
        super().__init__(model.config.max_seq_len)
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(1, self.max_len)

    def _forward(self, new: list[int], pos: int) -> torch.Tensor:
        idx = torch.tensor([new], dtype=torch.long, device=self.device)
        return self.model(idx, cache=self.cache, pos=pos)[0][0, -1]
