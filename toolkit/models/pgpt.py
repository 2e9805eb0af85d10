"""PGPT-Lformer (attn_demo): PaLM-style parallel blocks, QK-norm, rotary, attention-II, soft-capped logits.

Block:  n = N(x);  x <- lam * x + FFN(n) + SelfAttn(n) [+ CrossAttn(n, memory)]
with one parameter-free RMSNorm N (other norms are switches), a learnable scalar lam (init 1) or a
fixed 1, and no second norm. Model: embedding -> RMSNorm -> blocks -> RMSNorm -> zero-initialised head
-> softcap * tanh(z / softcap). The same `Block` serves as a causal decoder block, a bidirectional
encoder block (`causal=False`) and a decoder block with cross-attention (`cross=True`, `memory=`).

Attention-II: two extra projections q_B, k_B (normalised and rotated like q, k) whose un-softmaxed,
masked scores A = mask * (q_B k_B^T) * scale are summed over the keys and added to every channel of
the head's output: a per-head, per-position shift. The masked sum over keys of q_B.k_B equals
q_B . (sum of the visible k_B), so it is a cumulative sum of k_B here (O(T), no T x T matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.errors import check, check_choice
from toolkit.models.base import LanguageModel
from toolkit.models.common import KVCache, causal_mask, rope_tables

NORMS = ("rmsnorm", "layernorm", "layernorm_nobias", "l2norm", "none")
# head_rmsnorm: each head's dh-vector, no gain (the seed's dynamic_shape_rmsnorm, its default);
# rmsnorm / layernorm: jointly over all heads with an [H, dh] gain; l2norm: unit vectors per head with a
# learnable logit scale initialised to log(T^2 - T)
QK_NORMS = ("head_rmsnorm", "rmsnorm", "layernorm", "l2norm", "none")


@dataclass(frozen=True)
class Config:
    family: ClassVar[str] = "pgpt"
    dim: int = 768
    n_layers: int = 4
    n_heads: int = 12
    head_dim: int = 64  # dim must equal n_heads * head_dim
    ff_mult: int = 4
    vocab_size: int = 0  # 0 = the tokenizer's
    max_seq_len: int = 512
    learn_lambda: bool = True  # lam is a learnable scalar (init 1); false: fixed 1
    norm: str = "rmsnorm"  # the block's layerwise norm N
    qk_norm: str = "head_rmsnorm"
    attention_ii: bool = True
    rope_base: float = 1000.0
    softcap: float = 30.0  # 0 = off
    z_loss: float = 1e-4  # coefficient; 0 = off
    z_loss_kind: str = "global"  # global: (logsumexp over the whole logits tensor)^2 (seed); token: PaLM's mean
    loss_mean: str = "sequence"  # sequence: mean over each row's real targets, then over rows (seed); token
    norm_eps: float = 1e-6

    def __post_init__(self):
        check(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "dim", "positive dim, n_layers, n_heads")
        check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "a positive even head size (rotary)")
        check(self.n_heads * self.head_dim == self.dim, "head_dim",
              f"n_heads * head_dim == dim ({self.n_heads} * {self.head_dim} != {self.dim})")
        check(self.ff_mult > 0, "ff_mult", "a positive multiple of dim")
        check(self.vocab_size >= 0, "vocab_size", "0 (the tokenizer's) or a positive size")
        check(self.max_seq_len > 1, "max_seq_len", "a length of at least 2")
        check_choice(self.norm, "norm", NORMS)
        check_choice(self.qk_norm, "qk_norm", QK_NORMS)
        check(self.rope_base > 0, "rope_base", "a positive rotary base")
        check(self.softcap >= 0, "softcap", "0 (off) or a positive cap")
        check(self.z_loss >= 0, "z_loss", "0 (off) or a positive coefficient")
        check_choice(self.z_loss_kind, "z_loss_kind", ("global", "token"))
        check_choice(self.loss_mean, "loss_mean", ("sequence", "token"))
        check(self.norm_eps > 0, "norm_eps", "a positive epsilon")


# ---------------------------------------------------------------------------------------------------------
# pieces


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class Norm(nn.Module):
    """The layerwise norm N: parameter-free RMSNorm by default."""

    def __init__(self, kind: str, dim: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind in ("layernorm", "layernorm_nobias"):
            self.ln = nn.LayerNorm(dim, eps=eps, bias=kind == "layernorm")

    def forward(self, x):
        if self.kind == "rmsnorm":
            return rms_norm(x, self.eps)
        if self.kind == "l2norm":
            return F.normalize(x, dim=-1, eps=self.eps)
        if self.kind == "none":
            return x
        return self.ln(x)


class QKNorm(nn.Module):
    """Normalises q or k of shape (B, H, T, dh)."""

    def __init__(self, kind: str, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind in ("rmsnorm", "layernorm"):
            self.weight = nn.Parameter(torch.ones(n_heads, 1, head_dim))
            self.bias = nn.Parameter(torch.zeros(n_heads, 1, head_dim)) if kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "head_rmsnorm":
            return rms_norm(x, self.eps)
        if self.kind == "l2norm":
            return F.normalize(x, dim=-1, eps=self.eps)
        if self.kind == "none":
            return x
        joint = x.transpose(1, 2)  # (B, T, H, dh): statistics over all heads of a position
        if self.kind == "rmsnorm":
            joint = F.rms_norm(joint, joint.shape[-2:], eps=self.eps)
        else:
            joint = F.layer_norm(joint, joint.shape[-2:], eps=self.eps)
        out = joint.transpose(1, 2) * self.weight
        return out + self.bias if self.bias is not None else out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary: the pair (x[i], x[i + dh/2]) turns by angle i of its position. x: (B, H, T, dh)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def make_cache(c: Config, batch: int, max_len: int, device, dtype) -> KVCache:
    """Per layer: rotated keys and values (B, H, max_len, dh) and, with attention-II, the running sum of k_B
    (extra "kb_sum", fp32). The decoder-only model's and the T5 decoder's."""
    shape = (batch, c.n_heads, max_len, c.head_dim)
    kb_sum = [torch.zeros(shape, device=device, dtype=torch.float32) for _ in range(c.n_layers)] \
        if c.attention_ii else None
    return KVCache(c.n_layers, batch, c.n_heads, c.head_dim, max_len, device, dtype, kb_sum=kb_sum)


def attention_mask(key_mask: torch.Tensor | None, tq: int, tk: int, causal: bool, device,
                   own: bool = True) -> torch.Tensor | None:
    """Boolean (B or 1, 1, tq, tk) mask of visible keys, or None when SDPA's own causal flag (or nothing) does.
    The queries are the last tq of tk positions. Query i sees key j if j is not padding and, when causal, j is
    not in its future. With `own`, a query also sees its own key, so no softmax row is empty (this only
    changes padding queries, whose outputs nothing real reads)."""
    if key_mask is None and (not causal or tq == tk or tq == 1):
        return None
    mask = causal_mask(tq, tk, device) if causal else torch.ones(tq, tk, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :].bool()
        if own:
            own_key = torch.arange(tk, device=device)[None, :] == torch.arange(tq, device=device)[:, None] + (tk - tq)
            mask = mask | own_key
    return mask


class SelfAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.head_dim, self.attention_ii = c.n_heads, c.head_dim, c.attention_ii
        # q, k, v (and q_B, k_B) in one bias-free projection; the output projection has a bias (seed)
        self.qkv = nn.Linear(c.dim, (5 if c.attention_ii else 3) * c.dim, bias=False)
        self.out = nn.Linear(c.dim, c.dim, bias=True)
        self.q_norm = QKNorm(c.qk_norm, c.n_heads, c.head_dim, c.norm_eps)
        self.k_norm = QKNorm(c.qk_norm, c.n_heads, c.head_dim, c.norm_eps)
        self.scale = 1.0 / math.sqrt(c.head_dim)
        # l2norm: unit q, k and a learnable logit scale (the seed multiplied the output by it: likely a bug)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.max_seq_len**2 - c.max_seq_len))) \
            if c.qk_norm == "l2norm" else None

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, n, cos, sin, causal: bool = True, key_mask=None, cache: KVCache | None = None,
                layer: int = 0, pos: int = 0):
        B, T, _ = n.shape
        parts = [self.heads(t) for t in self.qkv(n).chunk(5 if self.attention_ii else 3, dim=-1)]
        q, k, v = parts[:3]
        # QK-norm first, then rotary
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)
        mask = attention_mask(key_mask, T, k.shape[2], causal, n.device)
        scale = self.scale
        if self.logit_scale is not None:
            q, scale = q * self.logit_scale.to(q.dtype), 1.0
        plain_causal = causal and mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plain_causal, scale=scale)
        if self.attention_ii:
            y = y + self.shift(parts[3], parts[4], cos, sin, causal, key_mask, cache, layer, pos).unsqueeze(-1).to(y.dtype)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def shift(self, qb, kb, cos, sin, causal, key_mask, cache, layer, pos) -> torch.Tensor:
        """Attention-II: sum over visible keys j of (q_B[i] . k_B[j]) * scale, as (B, H, T)."""
        qb = apply_rope(self.q_norm(qb), cos, sin).float()
        kb = apply_rope(self.k_norm(kb), cos, sin).float()
        if key_mask is not None:
            kb = kb * key_mask[:, None, :, None].to(kb.dtype)
        if causal:
            kb_sum = kb.cumsum(dim=2)
            if cache is not None:
                running = cache.extra["kb_sum"][layer]
                if pos > 0:
                    kb_sum = kb_sum + running[:, :, pos - 1 : pos]
                running[:, :, pos : pos + kb.shape[2]] = kb_sum
        else:
            kb_sum = kb.sum(dim=2, keepdim=True)
        return (qb * kb_sum).sum(-1) * self.scale


class CrossAttention(nn.Module):
    """q from the block's normalised input, k and v from one projection of the encoder states; QK-norm, no
    rotary, the encoder's padding mask. (The T5 decoder's; not used by the decoder-only model.)"""

    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.q = nn.Linear(c.dim, c.dim, bias=False)
        self.kv = nn.Linear(c.dim, 2 * c.dim, bias=False)
        self.out = nn.Linear(c.dim, c.dim, bias=True)
        self.q_norm = QKNorm(c.qk_norm, c.n_heads, c.head_dim, c.norm_eps)
        self.k_norm = QKNorm(c.qk_norm, c.n_heads, c.head_dim, c.norm_eps)

    def project(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values (B, H, S, dh) of the encoder states: computed once per input in generation."""
        B, S, _ = memory.shape
        k, v = (t.view(B, S, self.n_heads, self.head_dim).transpose(1, 2) for t in self.kv(memory).chunk(2, dim=-1))
        return self.k_norm(k), v

    def forward(self, n, memory, memory_mask=None, memory_kv=None):
        B, T, _ = n.shape
        q = self.q(n).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = memory_kv if memory_kv is not None else self.project(memory)
        mask = memory_mask[:, None, None, :].bool() if memory_mask is not None else None
        y = F.scaled_dot_product_attention(self.q_norm(q), k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """Fused: one Linear dim -> 2 * ff * dim split into (x, gate); silu(gate) * x; Linear back. Biases (seed)."""

    def __init__(self, c: Config):
        super().__init__()
        self.up = nn.Linear(c.dim, 2 * c.ff_mult * c.dim, bias=True)
        self.down = nn.Linear(c.ff_mult * c.dim, c.dim, bias=True)

    def forward(self, n):
        x, gate = self.up(n).chunk(2, dim=-1)
        return self.down(F.silu(gate) * x)


class Block(nn.Module):
    """x <- lam * x + FFN(N(x)) + SelfAttn(N(x)) [+ CrossAttn(N(x), memory)]."""

    def __init__(self, c: Config, causal: bool = True, cross: bool = False):
        super().__init__()
        self.causal = causal
        self.norm = Norm(c.norm, c.dim, c.norm_eps)
        self.attn = SelfAttention(c)
        self.cross = CrossAttention(c) if cross else None
        self.ffn = SwiGLU(c)
        self.lam = nn.Parameter(torch.ones(())) if c.learn_lambda else None

    def forward(self, x, cos, sin, key_mask=None, memory=None, memory_mask=None, cache: KVCache | None = None,
                layer: int = 0, pos: int = 0, memory_kv=None):
        n = self.norm(x)
        out = self.ffn(n) + self.attn(n, cos, sin, self.causal, key_mask, cache, layer, pos)
        if self.cross is not None:
            out = out + self.cross(n, memory, memory_mask, memory_kv)
        return (x * self.lam if self.lam is not None else x) + out


# ---------------------------------------------------------------------------------------------------------
# losses


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(z / cap) if cap else z


def z_loss(z: torch.Tensor, kind: str) -> torch.Tensor:
    """global: (logsumexp over every element of the logits tensor)^2 (the seed); token: mean over positions of
    (logsumexp over the vocabulary)^2 (PaLM)."""
    if kind == "global":
        return torch.logsumexp(z.float().flatten(), dim=0) ** 2
    return (torch.logsumexp(z.float(), dim=-1) ** 2).mean()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mean: str) -> torch.Tensor:
    """Cross-entropy ignoring targets of -1; `sequence`: each row's mean over its real targets, then the mean
    over rows that have any; `token`: the mean over all real targets."""
    V = logits.size(-1)
    if mean == "token":
        return F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    per_token = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=-1,
                                reduction="none").view(targets.shape)
    counts = (targets >= 0).sum(-1)
    rows = (counts > 0).float()  # no boolean indexing: keeps shapes static for torch.compile
    per_row = per_token.sum(-1) / counts.clamp(min=1)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# the model


class Model(LanguageModel):
    def __init__(self, config: Config):
        super().__init__()
        assert config.vocab_size > 0, "vocab_size must be resolved before building"
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)  # PyTorch's default N(0, 1), as the seed
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        nn.init.zeros_(self.lm_head.weight)
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, targets=None, cache: KVCache | None = None, pos: int = 0, key_mask=None):
        """`key_mask` (B, T), true for real tokens: padding keys are hidden from every query."""
        c = self.config
        T = idx.shape[1]
        if key_mask is not None and cache is not None:
            raise ValueError("key_mask with a KV cache is not supported (generation runs unpadded rows)")
        if pos + T > c.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {c.max_seq_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = rms_norm(self.embed(idx), c.norm_eps)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, key_mask=key_mask, cache=cache, layer=i, pos=pos)
        z = self.lm_head(rms_norm(x, c.norm_eps)).float()
        logits = softcap(z, c.softcap)
        if targets is None:
            return logits, None
        loss = lm_loss(logits, targets, c.loss_mean)
        if c.z_loss:
            loss = loss + c.z_loss * z_loss(z, c.z_loss_kind)
        return logits, loss

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        p = self.embed.weight
        return make_cache(self.config, batch, max_len or self.config.max_seq_len, device or p.device, dtype or p.dtype)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (the embedding lookup is not a matmul) plus attention."""
        c = self.config
        T = seq_len or c.max_seq_len
        return 6 * (self.num_params() - self.embed.weight.numel()) + 12 * c.n_layers * c.dim * T
