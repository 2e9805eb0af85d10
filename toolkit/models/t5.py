"""T5 span denoising with PGPT-Lformer blocks (attn_demo's `is_t5` mode).

Encoder: embedding -> RMSNorm -> bidirectional parallel blocks (padding keys hidden) -> RMSNorm.
Decoder: embedding (no initial norm, as the seed) -> causal parallel blocks whose cross-attention reads the
encoder states -> RMSNorm -> head (zero-initialised, shared embedding table) -> soft-cap. Loss, z-loss and the
optimizer groups are the decoder-only PGPT-Lformer's (toolkit/models/pgpt.py).

`forward(idx, targets)`: idx is the corrupted encoder input (right-padded with pad), targets the denoising target
(sentinel + tokens per masked run, then EOS; -1 = padding). The decoder reads [start, targets[:-1]]. Fixes to the
seed, each with a switch back: the decoder starts from BOS (`decoder_start = "pad"`: the seed's pad, whose query
sees no key at all), and EOS and sentinels are in the loss (`loss_on_special = false`: the seed ignored them, so
its model never learns to stop).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.errors import UserError, check, check_choice
from toolkit.models import pgpt
from toolkit.models.base import LanguageModel
from toolkit.models.common import KVCache, rope_tables
from toolkit.models.pgpt import Block, lm_loss, rms_norm, softcap, z_loss


@dataclass(frozen=True)
class Config(pgpt.Config):
    family: ClassVar[str] = "t5"
    n_layers: int = 6  # blocks in each of the encoder and the decoder
    max_seq_len: int = 512  # encoder: the token window before corruption
    max_target_len: int = 0  # decoder tokens; 0 = max_seq_len
    # special ids; -1 = the tokenizer's (the trainer fills them in and saves them with the run)
    pad_id: int = -1
    eos_id: int = -1
    bos_id: int = -1
    sentinel_start: int = -1
    n_sentinels: int = -1
    decoder_start: str = "bos"  # bos | pad (the seed's: a fully masked first attention row)
    loss_on_special: bool = True  # false: the seed's labels (EOS and the first 100 sentinels ignored)
    # span corruption (toolkit/shards/span_corruption.py)
    mask_rate: float = 0.15
    mean_span: float = 3.0  # without the curriculum
    curriculum: bool = True  # the seed's adaptive span-length curriculum
    curriculum_buckets: int = 8
    curriculum_check_every: int = 300

    def __post_init__(self):
        super().__post_init__()
        check(self.max_target_len >= 0, "max_target_len", "0 (= max_seq_len) or a positive length")
        check_choice(self.decoder_start, "decoder_start", ("bos", "pad"))
        check(0.0 < self.mask_rate < 1.0, "mask_rate", "a fraction strictly between 0 and 1")
        check(self.mean_span >= 1.0, "mean_span", "a mean span length of at least 1")
        check(1 <= self.curriculum_buckets <= 12, "curriculum_buckets", "between 1 and 12")
        check(self.curriculum_check_every > 0, "curriculum_check_every", "a positive number of sequences")

    @property
    def target_len(self) -> int:
        return self.max_target_len or self.max_seq_len

    def with_tokenizer(self, tok) -> Config:
        """Fill in the special ids the tokenizer defines (bytes and audio tokenizers have them)."""
        needed = ("pad_id", "eos_id", "bos_id", "sentinel_start", "n_sentinels")
        if any(getattr(tok, n, None) is None for n in needed) or not tok.n_sentinels:
            raise UserError(f"the t5 family needs a tokenizer with pad, eos, bos and sentinel ids (kind bytes or "
                            f"audio with n_sentinels > 0), not {tok.kind}")
        return replace(self, **{n: getattr(tok, n) if getattr(self, n) == -1 else getattr(self, n) for n in needed})


class Model(LanguageModel):
    objective = "span_corruption"  # the trainer's sampler corrupts spans (toolkit.shards.span_corruption)
    is_encoder_decoder = True

    def __init__(self, config: Config):
        super().__init__()
        c = config
        assert c.vocab_size > 0 and c.pad_id >= 0, "vocab_size and the special ids must be resolved before building"
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)  # shared by encoder and decoder
        self.encoder = nn.ModuleList(Block(c, causal=False) for _ in range(c.n_layers))
        self.decoder = nn.ModuleList(Block(c, causal=True, cross=True) for _ in range(c.n_layers))
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        nn.init.zeros_(self.lm_head.weight)
        cos, sin = rope_tables(c.head_dim, max(c.max_seq_len, c.target_len), c.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # --- the two stacks ----------------------------------------------------------------------------

    def encode(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder states (B, S, dim) and the key mask (true = real token; None when nothing is padding)."""
        c = self.config
        S = idx.shape[1]
        if S > c.max_seq_len:
            raise ValueError(f"encoder input of {S} tokens exceeds max_seq_len {c.max_seq_len}")
        key_mask = idx != c.pad_id
        if bool(key_mask.all()):
            key_mask = None
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = rms_norm(self.embed(idx), c.norm_eps)
        for block in self.encoder:
            x = block(x, cos, sin, key_mask=key_mask)
        return rms_norm(x, c.norm_eps), key_mask

    def decode(self, dec_ids: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None,
               cache: KVCache | None = None, pos: int = 0, memory_kv: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft-capped logits (fp32) and the raw ones (for the z-loss) of decoder ids at positions pos..."""
        c = self.config
        T = dec_ids.shape[1]
        if pos + T > c.target_len:
            raise ValueError(f"decoder sequence of {pos + T} tokens exceeds max_target_len {c.target_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.embed(dec_ids)
        for i, block in enumerate(self.decoder):
            x = block(x, cos, sin, memory=memory, memory_mask=memory_mask, cache=cache, layer=i, pos=pos,
                      memory_kv=memory_kv[i] if memory_kv is not None else None)
        z = self.lm_head(rms_norm(x, c.norm_eps)).float()
        return softcap(z, c.softcap), z

    def decoder_input(self, targets: torch.Tensor) -> torch.Tensor:
        """[start, targets[:-1]] with padding (-1) as pad: teacher forcing."""
        c = self.config
        start = c.bos_id if c.decoder_start == "bos" else c.pad_id
        dec = torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], dim=1)
        return dec.masked_fill(dec < 0, c.pad_id)

    def loss_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets the loss counts: all of them, or (the seed) none of EOS and the first 100 sentinels."""
        c = self.config
        if c.loss_on_special:
            return targets
        special = (targets == c.eos_id) | ((targets >= c.sentinel_start) & (targets < c.sentinel_start + 100))
        return targets.masked_fill(special, -1)

    def forward(self, idx, targets=None, cache=None, pos: int = 0):
        if targets is None:
            raise ValueError("a T5 model needs targets (teacher forcing); to generate, use model.condition(inputs)")
        c = self.config
        memory, memory_mask = self.encode(idx)
        logits, z = self.decode(self.decoder_input(targets), memory, memory_mask)
        loss = lm_loss(logits, self.loss_targets(targets), c.loss_mean)
        if c.z_loss:
            loss = loss + c.z_loss * z_loss(z, c.z_loss_kind)
        return logits, loss

    # --- what the trainer, eval and generation ask of it ---------------------------------------------

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits, _ = self(x, y)  # teacher forcing on the corrupted val windows' targets
        return logits, {}

    @torch.no_grad()
    def row_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's mean cross-entropy over the targets the loss counts (the curriculum's feedback)."""
        t = self.loss_targets(targets)
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), t.reshape(-1), ignore_index=-1,
                                    reduction="none").view(t.shape)
        return per_token.sum(-1) / (t >= 0).sum(-1).clamp(min=1)

    def condition(self, enc_ids: torch.Tensor) -> Conditioned:
        return Conditioned(self, enc_ids)

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        p = self.embed.weight
        return pgpt.make_cache(self.config, batch, max_len or self.config.target_len, device or p.device,
                               dtype or p.dtype)


    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per encoder window token (what the trainer counts), an estimate: the encoder runs on
        every token, the decoder and head on the target, about mask_rate * (1 + 1 / mean_span) + EOS of them."""
        c = self.config
        T = seq_len or c.max_seq_len
        enc = sum(p.numel() for p in self.encoder.parameters())
        dec = sum(p.numel() for p in self.decoder.parameters()) + self.lm_head.weight.numel()
        frac = min(1.0, c.mask_rate * (1 + 1 / c.mean_span) + 1 / T)
        attn = 12 * c.n_layers * c.dim * T * (1 + frac * frac + frac)  # encoder self, decoder self, cross
        return 6 * enc + 6 * dec * frac + attn


class Conditioned(LanguageModel):
    """The decoder given one encoder input: encoder states and cross-attention keys/values computed once, so the
    one generation loop (toolkit.generate) runs it as a cached decoder-only model."""

    def __init__(self, model: Model, enc_ids: torch.Tensor):
        super().__init__()
        self.t5 = model
        self.config = types.SimpleNamespace(family="t5-decoder", max_seq_len=model.config.target_len)
        with torch.no_grad():
            memory, self.memory_mask = model.encode(enc_ids)
            self.memory_kv = [block.cross.project(memory) for block in model.decoder]

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        return self.t5.new_cache(batch, max_len, device, dtype)

    def forward(self, idx, targets=None, cache: KVCache | None = None, pos: int = 0):
        logits, _ = self.t5.decode(idx, None, self.memory_mask, cache, pos, self.memory_kv)
        return logits, None
