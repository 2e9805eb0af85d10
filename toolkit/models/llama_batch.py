"""One decode step for several Llama sequences at once, on CPU in fp32 (numpy), for the server's scheduler.

Each sequence keeps its own `LlamaCPUDecoder` (its own KV cache, its own prefill); `step` advances all of them by
one token in ONE pass over the weights: the projections, the feed-forward and the classifier are (B, dim) x
weight matrix products, so the weights are read once for B tokens instead of B times (a decode step is bound by
that read). Attention stays per sequence, each over its own cache up to its own position, so no sequence sees
another's keys and values, and sequences of any lengths share a step. The arithmetic is the batch-1 decoder's
(llama_cpu.py) row by row, up to the order of floating-point sums.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from toolkit.models.llama_cpu import LlamaCPUDecoder


class LlamaBatch:
    def __init__(self, model):
        self.model = model
        c = model.config
        self.c, self.rep, self.scale, self.eps = c, c.n_heads // c.kv_heads, 1.0 / math.sqrt(c.head_dim), float(c.norm_eps)

        def w(t):
            return t.detach().numpy()

        self.emb, self.norm, self.wcls = w(model.tok_embeddings.weight), w(model.norm.weight), w(model.output.weight)
        # W @ X with X (in, B): a row-major weight times a block of columns, faster in OpenBLAS than X.T @ W.T.
        # wq|wk|wv and w1|w3 are stacked (a copy of those weights) so that each is one product: at a few columns a
        # product costs about as much in call overhead as in arithmetic.
        self.layers = []
        for b in model.layers:
            a, f = b.attention, b.feed_forward
            wqkv = np.concatenate([w(a.wq.weight), w(a.wk.weight), w(a.wv.weight)])
            w13 = np.concatenate([w(f.w1.weight), w(f.w3.weight)])
            self.layers.append((w(b.attention_norm.weight)[:, None], wqkv, w(a.wo.weight),
                                w(b.ffn_norm.weight)[:, None], w13, w(f.w2.weight)))
        self.norm = self.norm[:, None]
        self.rope = (model.rope_cos.numpy() + 1j * model.rope_sin.numpy()).astype(np.complex64)

    def new_decoder(self) -> LlamaCPUDecoder:
        return LlamaCPUDecoder(self.model)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """RMSNorm of each column of x (dim, B), in one pass over the block (a Python loop per column cost more
        than the norm)."""
        inv = (np.float32(1.0) / np.sqrt(np.einsum("ij,ij->j", x, x) / np.float32(x.shape[0]) + np.float32(self.eps)))
        return x * weight * inv[None, :]

    def step(self, decoders: Sequence[LlamaCPUDecoder], tokens: Sequence[int], positions: Sequence[int],
             rows: Sequence[int] | None = None) -> np.ndarray:
        """Feed tokens[i] at positions[i] to decoders[i] (its cache holds positions 0..positions[i] - 1); write
        their keys and values into each one's cache; return the next-token logits of `rows` (default: all), one
        row each: (len(rows), vocab). A prompt token fed this way needs no logits, and the classifier is the
        largest product of the step."""
        c, rep, hd, B = self.c, self.rep, self.c.head_dim, len(decoders)
        pos = np.asarray(positions)
        if (pos >= c.max_seq_len).any() or (pos < 0).any():
            raise ValueError(f"positions must be in [0, {c.max_seq_len})")
        rope = self.rope[pos][:, None, :]  # (B, 1, hd/2)
        x = np.ascontiguousarray(self.emb[np.asarray(tokens)].T)  # (dim, B): one column per sequence
        y = np.empty((B, c.n_heads * hd), dtype=np.float32)
        nq, nkv, ffn = c.n_heads * hd, c.kv_heads * hd, c.ffn_dim
        for li, (an, wqkv, wo, fn, w13, w2) in enumerate(self.layers):
            qkv = np.ascontiguousarray((wqkv @ self._rms(x, an)).T)  # (B, nq + 2 nkv)
            q = (qkv[:, :nq].copy().view(np.complex64).reshape(B, c.n_heads, -1) * rope).view(np.float32)
            k = (qkv[:, nq : nq + nkv].copy().view(np.complex64).reshape(B, c.kv_heads, -1) * rope).view(np.float32)
            v = qkv[:, nq + nkv :].reshape(B, c.kv_heads, hd)
            for i, dec in enumerate(decoders):  # attention: each sequence over its own cache
                kc, vc, p = dec.layers[li][9], dec.layers[li][10], int(pos[i])
                kc[:, p] = k[i]
                vc[:, p] = v[i]
                qi = q[i].reshape(c.kv_heads, rep, hd)  # query head h uses key/value head h // rep
                att = np.matmul(qi, kc[:, : p + 1].transpose(0, 2, 1))  # (kv_heads, rep, p + 1)
                att = np.exp((att - att.max(axis=-1, keepdims=True)) * self.scale)
                att /= att.sum(axis=-1, keepdims=True)
                y[i] = np.matmul(att, vc[:, : p + 1]).reshape(-1)
            x += wo @ y.T
            h13 = w13 @ self._rms(x, fn)
            h = h13[:ffn]
            x += w2 @ (h / (np.float32(1.0) + np.exp(-h)) * h13[ffn:])
        if rows is not None:
            x = x[:, list(rows)]
        return np.ascontiguousarray((self.wcls @ self._rms(x, self.norm)).T)
