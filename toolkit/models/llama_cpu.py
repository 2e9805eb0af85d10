"""The Llama decoder for CPU, fp32, batch 1: one-token steps in numpy on the model's own weights and KV cache.

PyTorch's per-op overhead and MKL's gemv on AMD CPUs made the torch step 2.5-3x slower than run.c; this one is
on a par with it, both bound by memory bandwidth (benchmarks/generate.py). Threads: numpy's BLAS and torch run at
their configured defaults (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, torch.set_num_threads); the decoder sets and
times nothing, so a step does the same work whatever the machine's load.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from toolkit.models.common import CachedDecoder


class LlamaCPUDecoder(CachedDecoder):
    """CachedDecoder for toolkit.models.llama on CPU, fp32, batch 1 (`Model.make_decoder()` returns one there).
    Prompts of more than NUMPY_PREFILL tokens go through the model's own forward in one batch; shorter ones token
    by token in numpy (the first PyTorch matmul of a process costs a second of MKL start-up on a busy machine,
    more than a short prompt)."""

    NUMPY_PREFILL = 64

    def __init__(self, model):
        super().__init__(model)
        c = model.config
        self.c = c
        self.rep = c.n_heads // c.kv_heads
        self.scale = 1.0 / math.sqrt(c.head_dim)

        def w(t):
            return t.detach().numpy()

        self.emb, self.norm, self.wcls = w(model.tok_embeddings.weight), w(model.norm.weight), w(model.output.weight)
        self.layers = []
        for i, b in enumerate(model.layers):
            a, f = b.attention, b.feed_forward
            self.layers.append((w(b.attention_norm.weight), w(a.wq.weight), w(a.wk.weight), w(a.wv.weight),
                                w(a.wo.weight), w(b.ffn_norm.weight), w(f.w1.weight), w(f.w2.weight),
                                w(f.w3.weight), self.cache.k[i][0].numpy(), self.cache.v[i][0].numpy()))
        angles = model.rope_cos.numpy() + 1j * model.rope_sin.numpy()
        self.rope = angles.astype(np.complex64)  # (max_len, head_dim/2): x[2i] + i x[2i+1] times this
        self.eps = float(c.norm_eps)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x * weight * (1.0 / math.sqrt(float(np.dot(x, x)) / x.size + self.eps))

    def _forward(self, new: list[int], pos: int) -> torch.Tensor:
        if len(new) > self.NUMPY_PREFILL:
            return super()._forward(new, pos)
        for i, token in enumerate(new[:-1]):
            self._step(token, pos + i, logits=False)
        return self._step(new[-1], pos + len(new) - 1)

    def _step(self, token: int, pos: int, logits: bool = True) -> torch.Tensor | None:
        c, rep, hd = self.c, self.rep, self.c.head_dim
        rope = self.rope[pos]
        x = self.emb[token].copy()
        for an, wq, wk, wv, wo, fn, w1, w2, w3, kc, vc in self.layers:
            xb = self._rms(x, an)
            q = ((wq @ xb).view(np.complex64).reshape(c.n_heads, -1) * rope).view(np.float32)
            k = ((wk @ xb).view(np.complex64).reshape(c.kv_heads, -1) * rope).view(np.float32)
            kc[:, pos] = k
            vc[:, pos] = (wv @ xb).reshape(c.kv_heads, hd)
            q = q.reshape(c.kv_heads, rep, hd)  # query head h uses key/value head h // rep
            att = np.matmul(q, kc[:, : pos + 1].transpose(0, 2, 1))  # (kv_heads, rep, pos + 1)
            att = np.exp((att - att.max(axis=-1, keepdims=True)) * self.scale)
            att /= att.sum(axis=-1, keepdims=True)
            y = np.matmul(att, vc[:, : pos + 1]).reshape(-1)
            x += wo @ y
            xb = self._rms(x, fn)
            h = w1 @ xb
            x += w2 @ (h / (np.float32(1.0) + np.exp(-h)) * (w3 @ xb))
        if not logits:
            return None
        return torch.from_numpy(self.wcls @ self._rms(x, self.norm))
