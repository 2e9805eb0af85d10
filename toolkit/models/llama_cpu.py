"""The Llama decoder for CPU, fp32, in numpy: one-token steps and a batched prefill on a KV cache of its own
(`LlamaCPUDecoder`), and the server's step for many sequences at once (`LlamaBatch`).

PyTorch's per-op overhead at batch 1 made the torch step 2.5-3x slower than run.c; numpy's call overhead is a
few microseconds, so a step costs about its products, which are bound by memory bandwidth (benchmarks/generate.py).
The weights are copied once into `DecodeWeights`: wq|wk|wv and w1|w3 stacked and every matrix transposed, (in, out)
row-major, so that each product is `x @ W`. On weights larger than the cache OpenBLAS streams that layout about
twice as fast as `W @ x` at one thread, and as fast or faster at two (the 288/6/6 and 512/8/8 shapes, an AMD
EPYC); a decode step is 1.2-1.6x faster (docs/chat.md). Threads: numpy's BLAS runs at its configured default
(OPENBLAS_NUM_THREADS); the decoder sets and times nothing.

Nothing here imports torch: `NumpyLlama` holds a standard llama read straight from a .bin or a run folder, so that
`lmkit chat` answers without PyTorch's import (most of a short reply's time). `decode_weights(model)` makes the
same weights from a torch Model (toolkit.models.llama), which is how training samples and the server get here.
"""

from __future__ import annotations

import math
import weakref
from typing import Mapping, Sequence

import numpy as np

from toolkit.models.decoding import PrefixCacheDecoder
from toolkit.models.llama_config import tensor_shapes


def rope_table(head_dim: int, max_len: int, theta: float) -> np.ndarray:
    """(max_len, head_dim/2) complex64 turns, e^(i p theta^(-2j / head_dim)): the angles in float32 as
    toolkit.models.common.rope_tables makes them, their cos and sin rounded from float64."""
    freqs = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2]
                                                     / np.float32(head_dim)))
    angles = np.outer(np.arange(max_len, dtype=np.float32), freqs).astype(np.float64)
    return (np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64)


def rms_rows(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of each row of x (B, dim), in one pass over the block (a Python loop per row cost more)."""
    inv = np.float32(1.0) / np.sqrt(np.einsum("ij,ij->i", x, x) / np.float32(x.shape[1]) + np.float32(eps))
    return x * weight[None, :] * inv[:, None]


def rotate(x: np.ndarray, rope: np.ndarray, heads: int) -> np.ndarray:
    """RoPE on rows of x (B, heads * head_dim) at their positions' turns rope (B, 1, head_dim/2): interleaved pairs
    (x[2i] + i x[2i+1]), as run.c. Returns (B, heads, head_dim)."""
    return (np.ascontiguousarray(x).view(np.complex64).reshape(len(x), heads, -1) * rope).view(np.float32)


class DecodeWeights:
    """The decode-time copy of a llama's weights (fp32 numpy), shared by every decoder of one model: the batch-1
    decoder and the server's batched step (LlamaBatch) read the same arrays. `tensors` by parameter name, as
    `llama_config.tensor_shapes(config)` lists them."""

    def __init__(self, c, tensors: Mapping[str, np.ndarray]):
        def t(*names):
            return np.ascontiguousarray(np.concatenate([tensors[n] for n in names]).T)  # (in, out)

        self.c, self.rep, self.scale, self.eps = c, c.n_heads // c.kv_heads, 1.0 / math.sqrt(c.head_dim), float(c.norm_eps)
        self.nq, self.nkv, self.ffn = c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.ffn_dim
        self.emb, self.norm = tensors["tok_embeddings.weight"], tensors["norm.weight"]
        self.wcls = t("tok_embeddings.weight" if c.tie_embeddings else "output.weight")
        self.layers = []
        for i in range(c.n_layers):
            a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
            self.layers.append((tensors[f"layers.{i}.attention_norm.weight"], t(a + "wq.weight", a + "wk.weight",
                                a + "wv.weight"), t(a + "wo.weight"), tensors[f"layers.{i}.ffn_norm.weight"],
                                t(f + "w1.weight", f + "w3.weight"), t(f + "w2.weight")))
        self.rope = rope_table(c.head_dim, c.max_seq_len, c.rope_theta)


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (parameter versions, weakref)


def decode_weights(model) -> DecodeWeights:
    """A torch Model's DecodeWeights, made once and shared while a decoder holds them (a server's concurrent jobs,
    a chat's turns), made again when a parameter has changed since (an optimizer step bumps its version counter)."""

    def make():
        return DecodeWeights(model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()})

    try:
        key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:  # a parameter made under torch.inference_mode() keeps no version counter: no sharing
        return make()
    known = _shared.get(model)
    weights = known[1]() if known is not None and known[0] == key else None
    if weights is None:
        weights = make()
        _shared[model] = (key, weakref.ref(weights))
    return weights


class LlamaCPUDecoder(PrefixCacheDecoder):
    """The decoder (toolkit.generate) of a standard llama on CPU in fp32: `Model.make_decoder()` there, and
    `NumpyLlama.make_decoder()`. Logits are numpy (V,) float32. A prompt goes through in one batched pass (each
    product reads the weights once for all its tokens), a new token through `_step`."""

    def __init__(self, weights: DecodeWeights):
        c = weights.c
        super().__init__(c.max_seq_len)
        self.w = weights
        shape = (c.kv_heads, c.max_seq_len, c.head_dim)
        self.kv = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.n_layers)]

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x * weight * (1.0 / math.sqrt(float(np.dot(x, x)) / x.size + self.w.eps))

    def _forward(self, new: list[int], pos: int) -> np.ndarray:
        return self._step(new[0], pos) if len(new) == 1 else self._prefill(new, pos)

    def _step(self, token: int, pos: int) -> np.ndarray:
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
        return self._rms(x, w.norm) @ w.wcls

    def _prefill(self, new: list[int], pos: int) -> np.ndarray:
        """Tokens `new` at positions pos..end-1 in one pass: rows of (T, dim) through each product, causal
        attention over the cache; the logits after the last."""
        w, c = self.w, self.w.c
        nq, nkv, ffn, hd, kvh = w.nq, w.nkv, w.ffn, c.head_dim, c.kv_heads
        T, end = len(new), pos + len(new)
        rope = w.rope[pos:end][:, None, :]
        hidden = np.arange(end)[None, :] > np.arange(pos, end)[:, None]  # (T, end): key j after query i's position
        x = w.emb[np.asarray(new)]  # (T, dim), a copy
        for (an, wqkv, wo, fn, w13, w2), (kc, vc) in zip(w.layers, self.kv):
            qkv = rms_rows(x, an, w.eps) @ wqkv
            q = rotate(qkv[:, :nq], rope, c.n_heads).reshape(T, kvh, w.rep, hd).transpose(1, 2, 0, 3)
            kc[:, pos:end] = rotate(qkv[:, nq : nq + nkv], rope, kvh).transpose(1, 0, 2)
            vc[:, pos:end] = qkv[:, nq + nkv :].reshape(T, kvh, hd).transpose(1, 0, 2)
            att = np.matmul(q, kc[:, None, :end].transpose(0, 1, 3, 2))  # (kv_heads, rep, T, end)
            att[..., hidden] = -np.inf
            att = np.exp((att - att.max(axis=-1, keepdims=True)) * w.scale)
            att /= att.sum(axis=-1, keepdims=True)
            x += np.matmul(att, vc[:, None, :end]).transpose(2, 0, 1, 3).reshape(T, nq) @ wo
            h13 = rms_rows(x, fn, w.eps) @ w13
            h = h13[:, :ffn]
            x += (h / (np.float32(1.0) + np.exp(-h)) * h13[:, ffn:]) @ w2
        return self._rms(x[-1], w.norm) @ w.wcls


class LlamaBatch:
    """One decode step for several llama sequences at once, on CPU in fp32, for the server's scheduler.

    Each sequence keeps its own `LlamaCPUDecoder` (its own KV cache, its own prefill); `step` advances all of them
    by one token in ONE pass over the weights: the projections, the feed-forward and the classifier are
    (B, dim) x weight matrix products, so the weights are read once for B tokens instead of B times (a decode step
    is bound by that read). Attention stays per sequence, each over its own cache up to its own position, so no
    sequence sees another's keys and values, and sequences of any lengths share a step. The arithmetic is the
    batch-1 step's row by row, up to the order of floating-point sums."""

    def __init__(self, weights: DecodeWeights):
        self.w = weights  # (in, out) matrices: X @ W with X (B, in), as the batch-1 step's x @ W

    def new_decoder(self) -> LlamaCPUDecoder:
        return LlamaCPUDecoder(self.w)

    def step(self, decoders: Sequence[LlamaCPUDecoder], tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Feed tokens[i] at positions[i] to decoders[i] (its cache holds positions 0..positions[i] - 1); write
        their keys and values into each one's cache; return each one's next-token logits: (B, vocab)."""
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
        return rms_rows(x, w.norm, w.eps) @ w.wcls


class NumpyLlama:
    """A standard llama (no runtime_blockers) in fp32 numpy, for generation only: what chat and the server ask of
    a model (`config`, `num_params()`, `sampling_defaults()`, `eval()`, `make_decoder()`, `make_batch_decoder()`),
    loaded without torch."""

    is_encoder_decoder = False

    def __init__(self, config, tensors: Mapping[str, np.ndarray]):
        self.config = config
        self.weights = DecodeWeights(config, tensors)
        self._params = sum(a.size for a in tensors.values())

    @classmethod
    def from_tensors(cls, config, tensors: Mapping[str, np.ndarray]) -> NumpyLlama | None:
        """None unless `tensors` are exactly the fp32 weights of this standard llama (a tied model's output.weight
        may be there too); the caller then loads the torch model, whose loader says what is wrong."""
        shapes = tensor_shapes(config)
        extra = set(tensors) - set(shapes) - ({"output.weight"} if config.tie_embeddings else set())
        if extra or any(n not in tensors or tensors[n].shape != s or tensors[n].dtype != np.float32
                        for n, s in shapes.items()):
            return None
        return cls(config, {n: tensors[n] for n in shapes})

    def num_params(self) -> int:
        return self._params

    def sampling_defaults(self) -> dict:
        return {}

    def eval(self) -> NumpyLlama:
        return self

    def make_decoder(self) -> LlamaCPUDecoder:
        return LlamaCPUDecoder(self.weights)

    def make_batch_decoder(self) -> LlamaBatch:
        return LlamaBatch(self.weights)
