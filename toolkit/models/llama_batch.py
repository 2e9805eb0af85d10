"""One decode step for several Llama sequences at once, on CPU in fp32 (numpy), for the server's scheduler.

Each sequence keeps its own `LlamaCPUDecoder` (its own KV cache, its own prefill); `step` advances all of them by
one token in ONE pass over the weights: the projections, the feed-forward and the classifier are (B, dim) x
weight matrix products, so the weights are read once for B tokens instead of B times (a decode step is bound by
that read). Attention stays per sequence, each over its own cache up to its own position, so no sequence sees
another's keys and values, and sequences of any lengths share a step. The arithmetic is the batch-1 decoder's
(llama_cpu.py) row by row, up to the order of floating-point sums.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from toolkit.models.llama_cpu import DecodeWeights, LlamaCPUDecoder, rms_rows, rotate


class LlamaBatch:
    def __init__(self, weights: DecodeWeights):
        self.w = weights  # (in, out) matrices: X @ W with X (B, in), as the batch-1 step's x @ W

    def new_decoder(self) -> LlamaCPUDecoder:
        return LlamaCPUDecoder(self.w)

    def step(self, decoders: Sequence[LlamaCPUDecoder], tokens: Sequence[int], positions: Sequence[int],
             rows: Sequence[int] | None = None) -> np.ndarray:
        """Feed tokens[i] at positions[i] to decoders[i] (its cache holds positions 0..positions[i] - 1); write
        their keys and values into each one's cache; return the next-token logits of `rows` (default: all), one
        row each: (len(rows), vocab). A prompt token fed this way needs no logits, and the classifier is the
        largest product of the step."""
        w, c, B = self.w, self.w.c, len(decoders)
        nq, nkv, ffn, hd, rep = w.nq, w.nkv, w.ffn, c.head_dim, w.rep
        pos = np.asarray(positions)
        if (pos >= c.max_seq_len).any() or (pos < 0).any():
            raise ValueError(f"positions must be in [0, {c.max_seq_len})")
        rope = w.rope[pos][:, None, :]  # (B, 1, hd/2)
        x = w.emb[np.asarray(tokens)]  # (B, dim): one row per sequence (a copy: fancy indexing)
        y = np.empty((B, nq), dtype=np.float32)
        for li, (an, wqkv, wo, fn, w13, w2) in enumerate(w.layers):
            qkv = rms_rows(x, an, w.eps) @ wqkv  # (B, nq + 2 nkv)
            q, k = rotate(qkv[:, :nq], rope, c.n_heads), rotate(qkv[:, nq : nq + nkv], rope, c.kv_heads)
            v = qkv[:, nq + nkv :].reshape(B, c.kv_heads, hd)
            for i, dec in enumerate(decoders):  # attention: each sequence over its own cache
                (kc, vc), p = dec.kv[li], int(pos[i])
                kc[:, p] = k[i]
                vc[:, p] = v[i]
                qi = q[i].reshape(c.kv_heads, rep, hd)  # query head h uses key/value head h // rep
                att = np.matmul(qi, kc[:, : p + 1].transpose(0, 2, 1))  # (kv_heads, rep, p + 1)
                att = np.exp((att - att.max(axis=-1, keepdims=True)) * w.scale)
                att /= att.sum(axis=-1, keepdims=True)
                y[i] = np.matmul(att, vc[:, : p + 1]).reshape(-1)
            x += y @ wo
            h13 = rms_rows(x, fn, w.eps) @ w13
            h = h13[:, :ffn]
            x += (h / (np.float32(1.0) + np.exp(-h)) * h13[:, ffn:]) @ w2
        if rows is not None:
            x = x[list(rows)]
        return rms_rows(x, w.norm, w.eps) @ w.wcls
