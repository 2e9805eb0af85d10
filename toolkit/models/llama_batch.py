"""One decode step for several Llama sequences at once, on CPU in fp32 (numpy), for the server's scheduler.

Each sequence keeps its own `LlamaCPUDecoder` (its own KV cache, its own prefill); `step` advances all of them by
one token in ONE pass over the weights: the projections, the feed-forward and the classifier are (B, dim) x
weight matrix products, so the weights are read once for B tokens instead of B times (a decode step is bound by
that read). Attention stays per sequence, each over its own cache up to its own position, so no sequence sees
another's keys and values, and sequences of any lengths share a step. The arithmetic is the batch-1 decoder's
(llama_cpu.py) row by row.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from toolkit.models.llama_cpu import LlamaCPUDecoder


def batchable(model) -> bool:
    """Whether `model` decodes through LlamaCPUDecoder (llama on CPU in fp32), so LlamaBatch can step it."""
    from toolkit.models.llama import Model

    if not isinstance(model, Model):
        return False
    p = model.tok_embeddings.weight
    return p.device.type == "cpu" and p.dtype == torch.float32


class LlamaBatch:
    def __init__(self, model):
        self.model = model
        c = model.config
        self.c, self.rep, self.scale, self.eps = c, c.n_heads // c.kv_heads, 1.0 / math.sqrt(c.head_dim), float(c.norm_eps)

        def w(t):
            return t.detach().numpy()

        self.emb, self.norm, self.wcls = w(model.tok_embeddings.weight), w(model.norm.weight), w(model.output.weight)
        # per layer: norms and the matrices transposed once (x @ W.T as a (B, in) x (in, out) product)
        self.layers = []
        for b in model.layers:
            a, f = b.attention, b.feed_forward
            self.layers.append((w(b.attention_norm.weight), w(a.wq.weight).T, w(a.wk.weight).T, w(a.wv.weight).T,
                                w(a.wo.weight).T, w(b.ffn_norm.weight), w(f.w1.weight).T, w(f.w2.weight).T,
                                w(f.w3.weight).T))
        self.wcls_t = self.wcls.T
        self.rope = (model.rope_cos.numpy() + 1j * model.rope_sin.numpy()).astype(np.complex64)

    def new_decoder(self) -> LlamaCPUDecoder:
        return LlamaCPUDecoder(self.model)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Row-wise RMSNorm of (B, dim), each row as LlamaCPUDecoder._rms does it."""
        inv = np.array([1.0 / math.sqrt(float(np.dot(r, r)) / r.size + self.eps) for r in x], dtype=np.float32)
        return x * weight * inv[:, None]

    def step(self, decoders: Sequence[LlamaCPUDecoder], tokens: Sequence[int], positions: Sequence[int]
             ) -> np.ndarray:
        """Feed tokens[i] at positions[i] to decoders[i] (its cache holds positions 0..positions[i] - 1); write
        their keys and values into each one's cache; return the (B, vocab) next-token logits."""
        c, rep, hd, B = self.c, self.rep, self.c.head_dim, len(decoders)
        pos = np.asarray(positions)
        if (pos >= c.max_seq_len).any() or (pos < 0).any():
            raise ValueError(f"positions must be in [0, {c.max_seq_len})")
        rope = self.rope[pos][:, None, :]  # (B, 1, hd/2)
        x = self.emb[np.asarray(tokens)].copy()  # (B, dim)
        for li, (an, wq, wk, wv, wo, fn, w1, w2, w3) in enumerate(self.layers):
            xb = self._rms(x, an)
            q = ((xb @ wq).view(np.complex64).reshape(B, c.n_heads, -1) * rope).view(np.float32)
            k = ((xb @ wk).view(np.complex64).reshape(B, c.kv_heads, -1) * rope).view(np.float32)
            v = (xb @ wv).reshape(B, c.kv_heads, hd)
            y = np.empty((B, c.n_heads * hd), dtype=np.float32)
            for i, dec in enumerate(decoders):
                kc, vc, p = dec.layers[li][9], dec.layers[li][10], int(pos[i])
                kc[:, p] = k[i]
                vc[:, p] = v[i]
                qi = q[i].reshape(c.kv_heads, rep, hd)  # query head h uses key/value head h // rep
                att = np.matmul(qi, kc[:, : p + 1].transpose(0, 2, 1))  # (kv_heads, rep, p + 1)
                att = np.exp((att - att.max(axis=-1, keepdims=True)) * self.scale)
                att /= att.sum(axis=-1, keepdims=True)
                y[i] = np.matmul(att, vc[:, : p + 1]).reshape(-1)
            x += y @ wo
            xb = self._rms(x, fn)
            h = xb @ w1
            x += (h / (np.float32(1.0) + np.exp(-h)) * (xb @ w3)) @ w2
        return self._rms(x, self.norm) @ self.wcls_t
