"""Llama-2 as in llama2.c: RMSNorm, RoPE (interleaved pairs, as run.c), SwiGLU, GQA, no biases.

Parameter names follow llama2.c's model.py (tok_embeddings, layers.N.attention.wq, ...), so its
checkpoints map one to one and the .bin exporter needs no renaming or RoPE permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.models.base import LanguageModel
from toolkit.models.common import KVCache, attention, causal_sdpa_args, rope_tables
from toolkit.models.llama_config import Config  # noqa: F401 (toolkit.models.llama.Config, as every family's)
from toolkit.models.llama_cpu import LlamaBatch, LlamaCPUDecoder, cpu_decoder, decode_weights


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, H, T, D) by position angles (T, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.dropout = c.dropout if c.attention_dropout == -1.0 else c.attention_dropout
        self.qk_norm, self.eps = c.qk_norm, c.norm_eps
        self.impl = c.attention
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm_gain else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm_gain else None

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, pos: int = 0, ve=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x)
        if ve is not None:  # this layer's value embedding of the tokens
            v = v + ve.to(v.dtype)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # normalised with a gain, then rotated (a gain after RoPE would make q.k
            q, k = self.q_norm(q), self.k_norm(k)  # depend on more than the positions' distance)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm and self.q_norm is None:
            q = F.rms_norm(q, (self.head_dim,), eps=self.eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.eps)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)
        mask, causal = causal_sdpa_args(T, k.shape[2], x.device)
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = attention(q, k, v, mask, causal, self.dropout if self.training else 0.0, self.impl)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.relu2 = c.mlp == "relu2"
        self.w1 = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.w2 = nn.Linear(c.ffn_dim, c.dim, bias=False)
        if not self.relu2:
            self.w3 = nn.Linear(c.dim, c.ffn_dim, bias=False)

    def forward(self, x):
        if self.relu2:
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.feed_forward = FeedForward(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, pos=0, ve=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, cache, layer, pos, ve))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Model(LanguageModel):
    def __init__(self, config: Config):
        super().__init__()
        assert config.vocab_size > 0, "vocab_size must be resolved before building"
        self.config = config
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        n = c.value_embeddings
        self.value_embeds = nn.ModuleList(nn.Embedding(c.vocab_size, c.kv_heads * c.head_dim) for _ in range(n))
        self.value_table = {i: j for j in range(n) for i in (j, c.n_layers - n + j)}  # layer -> its table
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("w3.weight") or name.endswith("wo.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))
        if c.zero_init_out:
            for layer in self.layers:
                nn.init.zeros_(layer.attention.wo.weight)
                nn.init.zeros_(layer.feed_forward.w2.weight)
        for table in self.value_embeds:
            nn.init.zeros_(table.weight)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None, pos: int = 0):
        T = idx.shape[1]
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.dropout(self.tok_embeddings(idx))
        values = [table(idx) for table in self.value_embeds]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, pos, values[self.value_table[i]] if i in self.value_table else None)
        x = self.norm(x)
        logits = self.output(x)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """Keys and values (batch, kv_heads, max_len, head_dim) per layer."""
        c, p = self.config, self.tok_embeddings.weight
        return KVCache(c.n_layers, batch, c.kv_heads, c.head_dim, max_len or c.max_seq_len, device or p.device,
                       dtype or p.dtype)

    def make_decoder(self) -> LlamaCPUDecoder | None:
        """On CPU in fp32, the C or numpy decoder (toolkit.models.llama_cpu); elsewhere the generic cached one."""
        p = self.tok_embeddings.weight
        numpy_ok = p.device.type == "cpu" and p.dtype == torch.float32 and self.config.standard
        return cpu_decoder(decode_weights(self)) if numpy_ok else None

    def make_batch_decoder(self):
        """On CPU in fp32, the numpy step over many sequences at once (toolkit.models.llama_cpu.LlamaBatch)."""
        p = self.tok_embeddings.weight
        numpy_ok = p.device.type == "cpu" and p.dtype == torch.float32 and self.config.standard
        return LlamaBatch(decode_weights(self)) if numpy_ok else None

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B, as llama2.c's estimate_mfu."""
        c = self.config
        T = seq_len or c.max_seq_len
        return 6 * self.num_params() + 12 * c.n_layers * c.n_heads * c.head_dim * T
