"""The Llama decoder for CPU, fp32, batch 1: one-token steps in numpy on a KV cache of the model's.

PyTorch's per-op overhead at batch 1 made the torch step 2.5-3x slower than run.c; numpy's call overhead is a
few microseconds, so a step costs about its products, which are bound by memory bandwidth (benchmarks/generate.py).
The weights are copied once into `DecodeWeights`: wq|wk|wv and w1|w3 stacked and every matrix transposed, (in, out)
row-major, so that each product is `x @ W`. On weights larger than the cache OpenBLAS streams that layout about
twice as fast as `W @ x` at one thread, and as fast or faster at two (the 288/6/6 and 512/8/8 shapes, an AMD
EPYC); a decode step is 1.2-1.6x faster (docs/chat.md). Threads: numpy's BLAS runs at its configured default
(OPENBLAS_NUM_THREADS); the decoder sets and times nothing.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from toolkit.models.common import CachedDecoder


class DecodeWeights:
    """The decode-time copy of a llama's weights (fp32 numpy), shared by every decoder of one model: the batch-1
    decoder and the server's batched step (llama_batch.py) read the same arrays."""

    def __init__(self, model):
        c = model.config

        def w(t):
            return t.detach().numpy()

        def t(*ws):
            return np.ascontiguousarray(np.concatenate([w(x) for x in ws]).T)  # (in, out)

        self.c, self.rep, self.scale, self.eps = c, c.n_heads // c.kv_heads, 1.0 / math.sqrt(c.head_dim), float(c.norm_eps)
        self.nq, self.nkv, self.ffn = c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.ffn_dim
        self.emb, self.norm, self.wcls = w(model.tok_embeddings.weight), w(model.norm.weight), t(model.output.weight)
        self.layers = []
        for b in model.layers:
            a, f = b.attention, b.feed_forward
            self.layers.append((w(b.attention_norm.weight), t(a.wq.weight, a.wk.weight, a.wv.weight), t(a.wo.weight),
                                w(b.ffn_norm.weight), t(f.w1.weight, f.w3.weight), t(f.w2.weight)))
        angles = model.rope_cos.numpy() + 1j * model.rope_sin.numpy()
        self.rope = angles.astype(np.complex64)  # (max_len, head_dim/2): x[2i] + i x[2i+1] times this


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (parameter versions, weakref)


def decode_weights(model) -> DecodeWeights:
    """The model's DecodeWeights, made once and shared while a decoder holds them (a server's concurrent jobs, a
    chat's turns), made again when a parameter has changed since (an optimizer step bumps its version counter)."""
    try:
        key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:  # a parameter made under torch.inference_mode() keeps no version counter: no sharing
        return DecodeWeights(model)
    known = _shared.get(model)
    weights = known[1]() if known is not None and known[0] == key else None
    if weights is None:
        weights = DecodeWeights(model)
        _shared[model] = (key, weakref.ref(weights))
    return weights


class LlamaCPUDecoder(CachedDecoder):
    """CachedDecoder for toolkit.models.llama on CPU, fp32, batch 1 (`Model.make_decoder()` returns one there).
    Prompts of more than NUMPY_PREFILL tokens go through the model's own forward in one batch; shorter ones token
    by token in numpy (the first PyTorch matmul of a process costs a second of MKL start-up on a busy machine,
    more than a short prompt)."""

    NUMPY_PREFILL = 64

    def __init__(self, model, weights: DecodeWeights | None = None):
        super().__init__(model)
        self.w = weights or decode_weights(model)
        self.kv = [(self.cache.k[i][0].numpy(), self.cache.v[i][0].numpy()) for i in range(model.config.n_layers)]

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x * weight * (1.0 / math.sqrt(float(np.dot(x, x)) / x.size + self.w.eps))

    def _forward(self, new: list[int], pos: int) -> torch.Tensor:
        if len(new) > self.NUMPY_PREFILL:
            return super()._forward(new, pos)
        for i, token in enumerate(new[:-1]):
            self._step(token, pos + i, logits=False)
        return self._step(new[-1], pos + len(new) - 1)

    def _step(self, token: int, pos: int, logits: bool = True) -> torch.Tensor | None:
        w, c = self.w, self.w.c
        nq, nkv, ffn, hd = w.nq, w.nkv, w.ffn, c.head_dim
        rope = w.rope[pos]
        x = w.emb[token].copy()
        for (an, wqkv, wo, fn, w13, w2), (kc, vc) in zip(w.layers, self.kv):
            qkv = self._rms(x, an) @ wqkv
            q = (qkv[:nq].view(np.complex64).reshape(c.n_heads, -1) * rope).view(np.float32)
            kc[:, pos] = (qkv[nq : nq + nkv].view(np.complex64).reshape(c.kv_heads, -1) * rope).view(np.float32)
            vc[:, pos] = qkv[nq + nkv :].reshape(c.kv_heads, hd)
            q = q.reshape(c.kv_heads, w.rep, hd)  # query head h uses key/value head h // rep
            att = np.matmul(q, kc[:, : pos + 1].transpose(0, 2, 1))  # (kv_heads, rep, pos + 1)
            att = np.exp((att - att.max(axis=-1, keepdims=True)) * w.scale)
            att /= att.sum(axis=-1, keepdims=True)
            x += np.matmul(att, vc[:, : pos + 1]).reshape(-1) @ wo
            h13 = self._rms(x, fn) @ w13
            h = h13[:ffn]
            x += (h / (np.float32(1.0) + np.exp(-h)) * h13[ffn:]) @ w2
        if not logits:
            return None
        return torch.from_numpy(self._rms(x, w.norm) @ w.wcls)
