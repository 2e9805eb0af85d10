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

import ctypes
import functools
import importlib.util
import math
import os
import weakref
from typing import Mapping, Sequence

import numpy as np

from toolkit.errors import UserError
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
        c_layout = c_library() is not None

        def t(*names):  # (in, out) for `x @ W`: a view of the (out, in) rows the C step reads, else a copy
            rows = np.concatenate([tensors[n] for n in names])
            return rows.T if c_layout else np.ascontiguousarray(rows.T)

        self.c, self.rep, self.scale, self.eps = c, c.n_heads // c.kv_heads, 1.0 / math.sqrt(c.head_dim), float(c.norm_eps)
        self.nq, self.nkv, self.ffn = c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.ffn_dim
        self.emb, self.norm = tensors["tok_embeddings.weight"], tensors["norm.weight"]
        # tied: the C step's classifier is the embedding itself, as run.c's (a copy would be 4.7 MB more to keep in
        # cache for a 288-wide model with 4096 tokens, where the whole model is about the L3 cache's size)
        self.wcls = (self.emb.T if c_layout and self.emb.flags.c_contiguous and self.emb.dtype == np.float32
                     else t("tok_embeddings.weight")) if c.tie_embeddings else t("output.weight")
        self.layers = []
        for i in range(c.n_layers):
            a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
            self.layers.append((tensors[f"layers.{i}.attention_norm.weight"], t(a + "wq.weight", a + "wk.weight",
                                a + "wv.weight"), t(a + "wo.weight"), tensors[f"layers.{i}.ffn_norm.weight"],
                                t(f + "w1.weight", f + "w3.weight"), t(f + "w2.weight")))
        self.rope = rope_table(c.head_dim, c.max_seq_len, c.rope_theta)
        self._c_step: dict[str, CStepWeights] = {}

    def c_step(self, dtype: str) -> CStepWeights:
        """The weights as the C step reads them, made once per dtype and shared by this model's decoders."""
        if dtype not in self._c_step:
            self._c_step[dtype] = CStepWeights(self, dtype)
        return self._c_step[dtype]


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
    """The numpy decoder (toolkit.generate) of a standard llama on CPU in fp32: `Model.make_decoder()` there, and
    `NumpyLlama.make_decoder()`. Logits are numpy (V,) float32. A prompt goes through in one batched pass (each
    product reads the weights once for all its tokens), a new token through `_step`."""

    backend = "numpy"
    dtype = "float32"

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


STEP_ENV = "LMKIT_DECODE_STEP"  # "numpy": the numpy step even where the C one was built; "c": the C one or an error
DTYPES = ("float32", "bfloat16", "int8")
NOT_BUILT = "reinstall lmkit (make install) with a C compiler (gcc or clang) on the PATH"


class _CWeights(ctypes.Structure):
    """llama_cpu.c's Weights."""
    _fields_ = ([(n, ctypes.c_int) for n in ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "ffn_dim",
                                             "vocab_size", "max_seq_len", "wtype")]
                + [("eps", ctypes.c_float)] + [(n, ctypes.c_void_p) for n in ("emb", "norm", "wcls", "rope")]
                + [(n, ctypes.POINTER(ctypes.c_void_p)) for n in ("attn_norm", "ffn_norm", "wqkv", "wo", "w13", "w2")]
                + [("wcls_scale", ctypes.c_void_p)]
                + [(n + "_scale", ctypes.POINTER(ctypes.c_void_p)) for n in ("wqkv", "wo", "w13", "w2")])


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """The C decode step (toolkit/models/llama_cpu.c, built at install by setup.py), or None where it was not
    built (no C compiler then) or LMKIT_DECODE_STEP=numpy."""
    choice = os.environ.get(STEP_ENV, "").lower()
    if choice not in ("", "c", "numpy"):
        raise UserError(f"{STEP_ENV}={choice}: expected c or numpy")
    prefetch = os.environ.get("LMKIT_PREFETCH", "16384")
    if not prefetch.isdigit():
        raise UserError(f"LMKIT_PREFETCH={prefetch}: expected a number of bytes (0 = no prefetch)")
    spec = None if choice == "numpy" else importlib.util.find_spec("toolkit.models._llama_cpu")
    if spec is None or not spec.origin:
        if choice == "c":
            raise UserError(f"{STEP_ENV}=c but the C decode step was not built: {NOT_BUILT}")
        return None
    lib = ctypes.CDLL(spec.origin)
    if lib.llama_cpu_abi() != 3:
        return None  # a library from another version of llama_cpu.c: the numpy step is right, if slower
    lib.llama_cpu_set_prefetch(ctypes.c_long(int(prefetch)))
    lib.llama_cpu_forward.restype = None
    lib.llama_cpu_forward.argtypes = [ctypes.POINTER(_CWeights), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as torch rounds (finite values: the sum stays
    under 2^32)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)


def to_int8_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) float32 rows -> int8 rows and one float32 scale per row, symmetric (row ~ scale * int8 row, the
    largest |value| of a row to 127): per-channel weight-only int8, as torchao's int8_weight_only."""
    a = np.asarray(a, dtype=np.float32)
    scale = np.abs(a).max(axis=1) / 127.0
    q = np.rint(a / np.where(scale > 0, scale, 1.0)[:, None])
    return np.clip(q, -127, 127).astype(np.int8), scale.astype(np.float32)


class CStepWeights:
    """DecodeWeights as llama_cpu.c's Weights: the fp32 arrays themselves, or bfloat16 or int8 (with row scales)
    copies of the matrices (the embedding and the gains stay fp32, as they are read a row at a time)."""

    def __init__(self, w: DecodeWeights, dtype: str):
        c = w.c
        conv = {"float32": lambda a: (a, None), "bfloat16": lambda a: (to_bfloat16(a), None),
                "int8": to_int8_rows}[dtype]  # of m.T: (out, in) rows, no copy in fp32
        self.keep = []  # every array and pointer table the struct points into

        def ptr(a):
            a = np.ascontiguousarray(a)
            self.keep.append(a)
            return a.ctypes.data

        def table(arrays):
            t = (ctypes.c_void_p * len(arrays))(*[ptr(a) for a in arrays])
            self.keep.append(t)
            return t

        cols = list(zip(*w.layers))  # an, wqkv, wo, fn, w13, w2, each per layer
        wcls, wcls_scale = conv(w.wcls.T)
        mats = [[conv(m.T) for m in cols[i]] for i in (1, 2, 4, 5)]  # per matrix kind, per layer: (rows, scale)
        scales = [table([s for _, s in m]) for m in mats] if dtype == "int8" else [None] * 4
        self.struct = _CWeights(c.dim, c.n_layers, c.n_heads, c.kv_heads, c.head_dim, c.ffn_dim, c.vocab_size,
                                c.max_seq_len, DTYPES.index(dtype), w.eps, ptr(w.emb.astype(np.float32, copy=False)),
                                ptr(w.norm), ptr(wcls), ptr(w.rope.view(np.float32)), table(cols[0]), table(cols[3]),
                                *(table([r for r, _ in m]) for m in mats),
                                ptr(wcls_scale) if wcls_scale is not None else None, *scales)
        self.scratch_size = 3 * c.dim + 2 * (c.n_heads + 2 * c.kv_heads) * c.head_dim + c.n_heads * c.max_seq_len \
            + 2 * c.ffn_dim


class CLlamaDecoder(LlamaCPUDecoder):
    """The same decoder with llama_cpu.c's one-token step (OpenMP threads: OMP_NUM_THREADS, default all cores).
    In fp32 a prompt still goes through numpy's batched prefill (each product reads the weights once for all its
    tokens); in bfloat16 and int8 every token goes through the C step, so the numbers are theirs throughout."""

    backend = "C"

    @property
    def threads(self) -> int:
        return self.lib.llama_cpu_threads()

    def __init__(self, weights: DecodeWeights, lib: ctypes.CDLL, dtype: str = "float32"):
        super().__init__(weights)
        self.lib, self.dtype, self.cw = lib, dtype, weights.c_step(dtype)
        self.scratch = np.zeros(self.cw.scratch_size, np.float32)
        self.k_ptrs = (ctypes.c_void_p * len(self.kv))(*[k.ctypes.data for k, _ in self.kv])
        self.v_ptrs = (ctypes.c_void_p * len(self.kv))(*[v.ctypes.data for _, v in self.kv])

    def _forward(self, new: list[int], pos: int) -> np.ndarray:
        if len(new) > 1 and self.dtype == "float32":
            return self._prefill(new, pos)
        if pos + len(new) > self.max_len:
            raise ValueError(f"{pos + len(new)} tokens exceed the context of {self.max_len}")
        tokens = np.asarray(new, dtype=np.int32)
        if tokens.min() < 0 or tokens.max() >= self.w.c.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.w.c.vocab_size})")
        logits = np.empty(self.w.c.vocab_size, np.float32)
        self.lib.llama_cpu_forward(ctypes.byref(self.cw.struct), self.k_ptrs, self.v_ptrs, self.scratch.ctypes.data,
                                   tokens.ctypes.data, len(tokens), pos, logits.ctypes.data)
        return logits


def check_decode_dtype(dtype: str) -> None:
    """ValueError unless a llama can decode in `dtype` here: bfloat16 and int8 are the C step's only."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype != "float32" and c_library() is None:
        raise ValueError(f"{dtype} weights need the C decode step, which was not built here: {NOT_BUILT}, or run in float32")


def cpu_decoder(weights: DecodeWeights, dtype: str = "float32") -> LlamaCPUDecoder:
    """The CPU decoder for these weights: the C step where it was built, else the numpy one (fp32 only)."""
    check_decode_dtype(dtype)
    lib = c_library()
    return LlamaCPUDecoder(weights) if lib is None else CLlamaDecoder(weights, lib, dtype)


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
        return cpu_decoder(self.w)  # a job's prompt, and its steps when it runs alone

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
    decode_dtype = "float32"  # the C step's weights: bfloat16 halves what each token reads, int8 quarters it

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
        return cpu_decoder(self.weights, self.decode_dtype)

    def make_batch_decoder(self) -> LlamaBatch:
        return LlamaBatch(self.weights)
