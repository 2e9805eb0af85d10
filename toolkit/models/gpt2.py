"""GPT-2 (pre-LN, learned absolute positions, tied head, GELU MLP) and its Resonance variant.

Resonance (seeds.md §3) adds, behind config switches:
- a phase table V x F (F = n_frequencies), projected F -> dim and blended into the token embedding with a
  per-dimension sigmoid gate: x = (1 - s) * tok + s * proj(phase) + pos, s = sigmoid(blend);
- R[i, j] = mean_f cos(phi_i,f - phi_j,f), added as lambda_h * R to every layer's attention scores before
  the causal mask (lambda per head per layer). R is computed as the rank-2F product u u^T with
  u = [cos phi, sin phi] / sqrt(F), never as a B x S x S x F tensor.

Ablations: `resonance_bias = "none"` (blend without R), `phase_blend = false` (R without blend),
`resonance_bias = "same_token"` (R[i, j] = 1 where the tokens are equal: the "R = I" bias),
`freeze_phases = true` (phases stay at their init). `seed_faithful_position_init` reproduces the seed
baseline's N(0, 1) position table (the fair default is N(0, 0.02), as the resonance models had).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.errors import check, check_choice
from toolkit.models.base import LanguageModel
from toolkit.models.common import KVCache, additive_mask, causal_mask


@dataclass(frozen=True)
class Config:
    family: ClassVar[str] = "gpt2"
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 0  # 0 = the tokenizer's
    hidden_dim: int = 0  # 0 = 4 * dim
    max_seq_len: int = 256
    dropout: float = 0.1
    norm_eps: float = 1e-5
    seed_faithful_position_init: bool = False  # N(0, 1) positions, as the seed's baseline (an init bug)
    # Resonance
    resonance: bool = False
    n_frequencies: int = 32
    phase_init_std: float = 0.3
    blend_init: float = 0.3  # raw value; the mix is sigmoid(blend)
    lambda_init: float = 0.1
    resonance_bias: str = "phase"  # phase (mean cos of phase differences) | same_token (R = I) | none
    phase_blend: bool = True  # blend the projected phases into the input embedding
    freeze_phases: bool = False
    rhyme_init: bool = False  # CMU-dictionary rhyme groups (needs `pronouncing` and the tokenizer's token strings)

    def __post_init__(self):
        check(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "dim", "positive dim, n_layers, n_heads")
        check(self.dim % self.n_heads == 0, "n_heads", f"a divisor of dim={self.dim}, got {self.n_heads}")
        check(self.vocab_size >= 0, "vocab_size", "0 (the tokenizer's) or a positive size")
        check(self.hidden_dim >= 0, "hidden_dim", "0 (4 * dim) or a positive size")
        check(self.max_seq_len > 0, "max_seq_len", "a positive length")
        check(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")
        check(self.n_frequencies > 0, "n_frequencies", "a positive count")
        check(self.phase_init_std >= 0, "phase_init_std", "a standard deviation >= 0")
        check_choice(self.resonance_bias, "resonance_bias", ("phase", "same_token", "none"))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.hidden_dim or 4 * self.dim

    @property
    def uses_phases(self) -> bool:
        return self.resonance and (self.phase_blend or self.resonance_bias == "phase")

    @property
    def uses_bias(self) -> bool:
        return self.resonance and self.resonance_bias != "none"


def phase_features(phases: torch.Tensor) -> torch.Tensor:
    """u = [cos phi, sin phi] / sqrt(F), so that u_i . u_j = mean_f cos(phi_i,f - phi_j,f)."""
    n = phases.shape[-1]
    return torch.cat((phases.cos(), phases.sin()), dim=-1) * n**-0.5


def resonance_matrix(phases_q: torch.Tensor, phases_k: torch.Tensor) -> torch.Tensor:
    """R (B, Tq, Tk) from phases (B, Tq, F) and (B, Tk, F): one rank-2F matmul."""
    return phase_features(phases_q.float()) @ phase_features(phases_k.float()).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.proj = nn.Linear(c.dim, c.dim, bias=False)
        self.dropout = c.dropout
        # lambda_h: the weight of the resonance bias, per head (and, one module per block, per layer)
        self.res_lambda = nn.Parameter(torch.full((c.n_heads,), c.lambda_init)) if c.uses_bias else None

    def forward(self, x, R=None, causal=None, cache: KVCache | None = None, layer: int = 0, pos: int = 0):
        """R (B, T, Tk) is the resonance matrix; `causal` (T, Tk) the additive causal mask (0 / -inf)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)
        dropout = self.dropout if self.training else 0.0
        if self.res_lambda is not None:
            # scores = q k^T / sqrt(d) + lambda_h R, then the causal mask: one additive float mask for SDPA
            mask = (self.res_lambda.view(1, -1, 1, 1) * R.unsqueeze(1) + causal).to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif causal is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal.to(q.dtype), dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.fc = nn.Linear(c.dim, c.ffn_dim)
        self.proj = nn.Linear(c.ffn_dim, c.dim)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ln2 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, R=None, causal=None, cache=None, layer=0, pos=0):
        x = x + self.dropout(self.attn(self.ln1(x), R, causal, cache, layer, pos))
        return x + self.mlp(self.ln2(x))


class Model(LanguageModel):
    def __init__(self, config: Config, token_strings: Sequence[str] | None = None):
        """`token_strings`: the text of each token id (the tokenizer's), for `rhyme_init`; without them (a model
        built to load weights into) the phases keep their random init."""
        super().__init__()
        assert config.vocab_size > 0, "vocab_size must be resolved before building"
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.dim)
        self.phase = self.phase_proj = self.blend = None
        if c.uses_phases:
            self.phase = nn.Embedding(c.vocab_size, c.n_frequencies)
        if c.resonance and c.phase_blend:
            self.phase_proj = nn.Linear(c.n_frequencies, c.dim, bias=False)
            self.blend = nn.Parameter(torch.full((c.dim,), c.blend_init))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb.weight, 0.0, 1.0 if c.seed_faithful_position_init else 0.02)
        if self.phase is not None:
            nn.init.normal_(self.phase.weight, 0.0, c.phase_init_std)
            if c.rhyme_init:
                rhyme_phase_init(self.phase.weight, c.phase_init_std, token_strings)
            self.phase.weight.requires_grad_(not c.freeze_phases)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, pos: int = 0):
        T = idx.shape[1]
        x = self.tok_emb(idx)
        if self.blend is not None:
            s = torch.sigmoid(self.blend)
            x = (1 - s) * x + s * self.phase_proj(self.phase(idx))
        return self.drop(x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device)))

    def resonance_bias(self, idx, cache: KVCache | None = None, pos: int = 0):
        """R (B, T, pos + T) between the T new tokens and every token so far, and the additive causal mask."""
        c, T = self.config, idx.shape[1]
        if c.resonance_bias == "phase":
            feats = phase_features(self.phase(idx).float())
        else:
            feats = idx
        if cache is not None:
            cache.extra["feats"][:, pos : pos + T] = feats
            feats_k = cache.extra["feats"][:, : pos + T]
        else:
            feats_k = feats
        if c.resonance_bias == "phase":
            R = feats @ feats_k.transpose(1, 2)
        else:
            R = (feats.unsqueeze(2) == feats_k.unsqueeze(1)).float()
        return R, additive_mask(causal_mask(T, pos + T, idx.device))

    def forward(self, idx, targets=None, cache: KVCache | None = None, pos: int = 0):
        T = idx.shape[1]
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        x = self.embed(idx, pos)
        R = causal = None
        if self.config.uses_bias:
            R, causal = self.resonance_bias(idx, cache, pos)
        elif cache is not None and (pos > 0 or T == 1):  # after cached tokens: query i sees keys <= pos + i
            causal = additive_mask(causal_mask(T, pos + T, idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, R, causal, cache, i, pos)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """Keys and values per layer, plus (extra "feats") what the resonance bias needs of every cached position:
        its phase features u (B, max_len, 2F), or its token id for the same-token bias."""
        c, p = self.config, self.tok_emb.weight
        max_len, device = max_len or c.max_seq_len, device or p.device
        feats = None
        if c.uses_bias and c.resonance_bias == "phase":
            feats = torch.zeros(batch, max_len, 2 * c.n_frequencies, device=device, dtype=torch.float32)
        elif c.uses_bias:
            feats = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        return KVCache(c.n_layers, batch, c.n_heads, c.head_dim, max_len, device, dtype or p.dtype, feats=feats)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N over the parameters used in matmuls (not the
        lookup-only position and phase tables), plus attention (12 L H dh T, as PaLM's estimate), plus, with
        the phase bias, the rank-2F product for R (2 * 2F * T per token forward, x3 with backward)."""
        c = self.config
        T = seq_len or c.max_seq_len
        lookups = self.pos_emb.weight.numel() + (self.phase.weight.numel() if self.phase is not None else 0)
        flops = 6 * (self.num_params() - lookups) + 12 * c.n_layers * c.n_heads * c.head_dim * T
        if c.uses_bias and c.resonance_bias == "phase":
            flops += 3 * 2 * (2 * c.n_frequencies) * T
        return flops


def rhyme_groups(token_strings: list[str], rhyming_part) -> dict[str, list[int]]:
    """Token ids grouped by the rhyming part of their word (seeds.md §3.3): letters only, lower case,
    at least 2 letters; `rhyming_part(word)` returns the group key or None when the word is unknown."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(token_strings):
        word = "".join(ch for ch in s.strip().lower() if "a" <= ch <= "z")
        if len(word) < 2:
            continue
        key = rhyming_part(word)
        if key:
            groups.setdefault(key, []).append(i)
    return groups


def apply_rhyme_groups(weight: torch.Tensor, groups: dict[str, list[int]], std: float,
                       generator: torch.Generator | None = None) -> None:
    """Each group shares a base vector N(0, std^2); members get base + N(0, (std / 10)^2)."""
    with torch.no_grad():
        for ids in groups.values():
            base = torch.randn(weight.shape[1], generator=generator) * std
            noise = torch.randn(len(ids), weight.shape[1], generator=generator) * (std / 10)
            weight[torch.tensor(ids)] = (base + noise).to(weight)


def rhyme_phase_init(weight: torch.Tensor, std: float, token_strings: Sequence[str] | None) -> bool:
    """Rhyme-group init with the CMU dictionary (`pronouncing`) over the given token strings (id i's text at
    index i). Keeps the random init: silently without strings (a model built to load trained weights into), with
    a warning when `pronouncing` is not installed."""
    if token_strings is None:
        return False
    try:
        import pronouncing
    except ImportError:
        warnings.warn("rhyme_init: the `pronouncing` package is not installed; phases keep their random init",
                      stacklevel=3)
        return False

    def rhyming_part(word):
        phones = pronouncing.phones_for_word(word)
        return pronouncing.rhyming_part(phones[0]) if phones else None

    apply_rhyme_groups(weight, rhyme_groups(list(token_strings[: weight.shape[0]]), rhyming_part), std)
    return True
