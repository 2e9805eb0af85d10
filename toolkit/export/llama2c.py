"""llama2.c model.bin: legacy v0 (what run.c reads), v1 (fp32, 256-byte header), v2 (Q8_0 int8, runq.c).

v0: 7 x int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
vocab_size means the classifier is stored at the end), then fp32 tensors: tok_embeddings, attention_norm x L,
wq x L, wk x L, wv x L, wo x L, ffn_norm x L, w1 x L, w2 x L, w3 x L, norm, RoPE cos and sin tables
(seq_len, head_size/2) that run.c skips but whose bytes must be there, then output if not shared.
v1/v2: magic "ak42", version, the 7 ints (vocab positive), uint8 shared flag (v2: then an unaligned int32
group size), zero padding to 256 bytes; norms first (fp32), then the matrices in the order tok_embeddings,
wq, wk, wv, wo, w1, w2, w3 (all layers each), output if not shared; v1 stores them fp32, v2 stores each
matrix as int8 q[numel] followed by fp32 scales[numel / group_size].

Parameter names are toolkit.models.llama's (llama2.c's own), so tensors map one to one, and its RoPE
rotates interleaved pairs like run.c: no permutation is needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write

if TYPE_CHECKING:
    import torch

MAGIC = 0x616B3432  # "ak42"
V1_HEADER = 256
V0_HEADER = 28
MAX_DIM = 1 << 20


@dataclass(frozen=True)
class Header:
    version: int  # 0, 1 or 2
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; v0 stores it negated when the classifier is not shared
    seq_len: int
    shared_classifier: bool = True
    group_size: int = 0  # v2 only

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


def _layer(i: int, name: str) -> str:
    prefix = "attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward"
    if name in ("attention_norm", "ffn_norm"):
        return f"layers.{i}.{name}.weight"
    return f"layers.{i}.{prefix}.{name}.weight"


def _shapes(h: Header) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by llama2.c parameter name (the order of this dict is not a file order)."""
    from toolkit.models.llama_config import tensor_shapes

    return tensor_shapes(model_config(h))


def _per_layer(h: Header, *names: str) -> list[str]:
    return [_layer(i, n) for n in names for i in range(h.n_layers)]


def v0_order(h: Header) -> list[str]:
    """Tensor order of a v0 file; "freq_cos"/"freq_sin" are the RoPE tables run.c skips."""
    order = ["tok_embeddings.weight", *_per_layer(h, "attention_norm"), *_per_layer(h, "wq"),
             *_per_layer(h, "wk"), *_per_layer(h, "wv"), *_per_layer(h, "wo"), *_per_layer(h, "ffn_norm"),
             *_per_layer(h, "w1"), *_per_layer(h, "w2"), *_per_layer(h, "w3"), "norm.weight", "freq_cos", "freq_sin"]
    return order + ([] if h.shared_classifier else ["output.weight"])


def v1_norms(h: Header) -> list[str]:
    return [*_per_layer(h, "attention_norm"), *_per_layer(h, "ffn_norm"), "norm.weight"]


def v1_matrices(h: Header) -> list[str]:
    order = ["tok_embeddings.weight", *_per_layer(h, "wq"), *_per_layer(h, "wk"), *_per_layer(h, "wv"),
             *_per_layer(h, "wo"), *_per_layer(h, "w1"), *_per_layer(h, "w2"), *_per_layer(h, "w3")]
    return order + ([] if h.shared_classifier else ["output.weight"])


def expected_size(h: Header) -> int:
    shapes = _shapes(h)
    numel = {k: int(np.prod(v)) for k, v in shapes.items()}
    if h.version == 0:
        rope = 2 * h.seq_len * (h.head_size // 2)
        return V0_HEADER + 4 * (sum(numel.values()) + rope)
    norms = 4 * sum(numel[k] for k in v1_norms(h))
    mats = [numel[k] for k in v1_matrices(h)]
    if h.version == 1:
        return V1_HEADER + norms + 4 * sum(mats)
    return V1_HEADER + norms + sum(n + 4 * (n // h.group_size) for n in mats)


# ---------------------------------------------------------------------------------------------------------
# Q8_0


def pick_group_size(dim: int, hidden_dim: int, requested: int = 0) -> int:
    """The requested group size if it divides dim and hidden_dim, else (0 = auto) the largest of 64, 32, ...
    that does. llama2.c only checks dim, which breaks runq.c for hidden_dim 1376 with 64."""
    if requested:
        if dim % requested or hidden_dim % requested:
            raise UserError(f"--group-size {requested} must divide both dim ({dim}) and hidden_dim ({hidden_dim})")
        return requested
    gs = 64
    while dim % gs or hidden_dim % gs:
        gs //= 2
    return gs


def quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group int8: scale = max|w| / 127, q = round(w / scale); an all-zero group gets scale 0."""
    groups = np.asarray(w, dtype=np.float32).reshape(-1, group_size)
    scale = np.abs(groups).max(axis=1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(groups / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(-1), scale.astype(np.float32)


def dequantize_q80(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    return (q.reshape(-1, group_size).astype(np.float32) * scale[:, None]).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# writing


def header_for(config, version: int, group_size: int = 0) -> Header:
    """The header for a toolkit.models.llama Config (vocab_size resolved)."""
    return Header(version, config.dim, config.ffn_dim, config.n_layers, config.n_heads, config.kv_heads,
                  config.vocab_size, config.max_seq_len, bool(config.tie_embeddings),
                  pick_group_size(config.dim, config.ffn_dim, group_size) if version == 2 else 0)


def pack_header(h: Header) -> bytes:
    ints = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads)
    if h.version == 0:
        vocab = h.vocab_size if h.shared_classifier else -h.vocab_size
        return struct.pack("<7i", *ints, vocab, h.seq_len)
    head = struct.pack("<Ii7iB", MAGIC, h.version, *ints, h.vocab_size, h.seq_len, int(h.shared_classifier))
    if h.version == 2:
        head += struct.pack("<i", h.group_size)  # unaligned, right after the shared byte (offset 37)
    return head + b"\0" * (V1_HEADER - len(head))


def _rope(h: Header, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    from toolkit.models.common import rope_tables

    cos, sin = rope_tables(h.head_size, h.seq_len, theta)
    return cos.numpy(), sin.numpy()


def write_bin(path: Path, h: Header, tensors: dict[str, torch.Tensor], rope_theta: float = 10000.0) -> None:
    """Write `tensors` (llama2.c names) as a version h.version model.bin; written to a temporary name first."""
    import torch

    shapes = _shapes(h)
    arrays = {}
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, header says {shape}")
        arrays[name] = t.numpy()
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(pack_header(h))
            if h.version == 0:
                cos, sin = _rope(h, rope_theta)
                arrays["freq_cos"], arrays["freq_sin"] = cos, sin
                for name in v0_order(h):
                    arrays[name].tofile(f)
            else:
                for name in v1_norms(h):
                    arrays[name].tofile(f)
                for name in v1_matrices(h):
                    if h.version == 1:
                        arrays[name].tofile(f)
                    else:
                        q, s = quantize_q80(arrays[name], h.group_size)
                        q.tofile(f)
                        s.tofile(f)
        if tmp.stat().st_size != expected_size(h):  # a bug here would make run.c read garbage: fail loudly
            raise AssertionError(f"wrote {tmp.stat().st_size} bytes, expected {expected_size(h)}")

    atomic_write(path, write)


def export_model(model, path: Path, version: int = 0, group_size: int = 0) -> Header:
    """Write a toolkit.models.llama Model as llama2.c model.bin version 0, 1 or 2."""
    config = model.config
    if getattr(config, "family", None) != "llama":
        raise UserError(f"only llama-family models can be exported to llama2.c .bin (this one is "
                        f"{getattr(config, 'family', type(model).__name__)!r})")
    blockers = config.runtime_blockers()
    if blockers:
        raise UserError(f"llama2.c's run.c cannot run this llama's {', '.join(blockers)}; only a model trained "
                        f"without them exports to .bin")
    h = header_for(config, version, group_size)
    write_bin(path, h, dict(getattr(model, "_orig_mod", model).state_dict()), config.rope_theta)
    return h


# ---------------------------------------------------------------------------------------------------------
# reading


def read_header(path: Path) -> Header:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER)
    if len(head) < V0_HEADER:
        raise UserError(f"{path}: {size} bytes is too short to be a llama2.c model.bin")
    magic, version = struct.unpack_from("<Ii", head, 0)
    if magic == MAGIC:
        if version not in (1, 2):
            raise UserError(f"{path}: llama2.c model.bin version {version} is not supported (only 0, 1 and 2)")
        if len(head) < V1_HEADER:
            raise UserError(f"{path}: truncated header ({size} bytes, a version {version} header is 256)")
        ints = struct.unpack_from("<7i", head, 8)
        shared = head[36]
        gs = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        h = Header(version, *ints, shared_classifier=bool(shared), group_size=gs)
        if shared not in (0, 1) or (version == 2 and (gs <= 0 or h.dim % gs)):
            raise UserError(f"{path}: bad version {version} header (shared={shared}, group_size={gs})")
    else:
        ints = struct.unpack_from("<7i", head, 0)
        dim, hidden, layers, heads, kv, vocab, seq = ints
        h = Header(0, dim, hidden, layers, heads, kv, abs(vocab), seq, shared_classifier=vocab > 0)
    _check_header(path, h)
    want = expected_size(h)
    if size < want:
        raise UserError(f"{path}: truncated: its v{h.version} header (dim {h.dim}, {h.n_layers} layers, vocab "
                        f"{h.vocab_size}) needs {want:,} bytes, the file has {size:,}; re-download or re-export it")
    if size > want:
        raise UserError(f"{path}: {size - want:,} bytes more than its v{h.version} header describes "
                        f"({want:,}); not a llama2.c model.bin, or a different version")
    return h


def _check_header(path: Path, h: Header) -> None:
    sane = (0 < h.dim <= MAX_DIM and 0 < h.hidden_dim <= 16 * MAX_DIM and 0 < h.n_layers <= 4096
            and 0 < h.n_heads <= h.dim and h.dim % h.n_heads == 0 and (h.dim // h.n_heads) % 2 == 0
            and 0 < h.n_kv_heads <= h.n_heads and h.n_heads % h.n_kv_heads == 0
            and 0 < h.vocab_size <= 1 << 24 and 0 < h.seq_len <= 1 << 24)
    if not sane:
        raise UserError(f"{path}: not a llama2.c model.bin (its header reads dim={h.dim}, hidden_dim={h.hidden_dim}, "
                        f"n_layers={h.n_layers}, n_heads={h.n_heads}, n_kv_heads={h.n_kv_heads}, "
                        f"vocab_size={h.vocab_size}, seq_len={h.seq_len})")


def read_bin(path: Path) -> tuple[Header, dict[str, np.ndarray]]:
    """(header, fp32 numpy arrays by llama2.c name); v2 matrices are dequantized; a shared classifier is not
    repeated as output.weight. Without torch: `lmkit chat` runs these in numpy (llama_cpu.NumpyLlama)."""
    path = Path(path)
    h = read_header(path)
    shapes = _shapes(h)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    off = V0_HEADER if h.version == 0 else V1_HEADER

    def take(dtype, count: int) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(data, dtype=dtype, count=count, offset=off)
        off += a.nbytes
        return a

    def put(name: str, flat: np.ndarray) -> None:
        out[name] = np.array(flat, dtype=np.float32).reshape(shapes[name])

    if h.version == 0:
        for name in v0_order(h):
            if name in ("freq_cos", "freq_sin"):
                take(np.float32, h.seq_len * (h.head_size // 2))
            else:
                put(name, take(np.float32, int(np.prod(shapes[name]))))
    else:
        for name in v1_norms(h):
            put(name, take(np.float32, int(np.prod(shapes[name]))))
        for name in v1_matrices(h):
            n = int(np.prod(shapes[name]))
            if h.version == 1:
                put(name, take(np.float32, n))
            else:
                q = take(np.int8, n)
                s = take(np.float32, n // h.group_size)
                put(name, dequantize_q80(q, s, h.group_size))
    return h, out


def model_config(h: Header, base=None):
    """A toolkit.models.llama Config for this header; `base` (a Config) supplies what the header cannot say
    (norm_eps, rope_theta, multiple_of, dropout)."""
    from dataclasses import replace

    from toolkit.models.llama_config import Config

    values = dict(dim=h.dim, hidden_dim=h.hidden_dim, n_layers=h.n_layers, n_heads=h.n_heads,
                  n_kv_heads=h.n_kv_heads, vocab_size=h.vocab_size, max_seq_len=h.seq_len,
                  tie_embeddings=h.shared_classifier)
    if base is None or getattr(base, "family", None) != "llama":
        return Config(**values)
    if base.ffn_dim == h.hidden_dim:
        del values["hidden_dim"]  # keep the recipe's own way of saying it (0 = derived)
    if base.kv_heads == h.n_kv_heads:
        del values["n_kv_heads"]
    return replace(base, **values)


def load_model(path: Path, base_config=None, device="cpu"):
    """A toolkit.models.llama Model with the weights of a llama2.c model.bin (any version)."""
    import torch

    from toolkit import models

    h, arrays = read_bin(path)
    model = models.build(model_config(h, base_config), init=False)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(a) for k, a in arrays.items()}, strict=False)
    missing = [k for k in missing if not (k == "output.weight" and h.shared_classifier)]
    if missing or unexpected:  # a bug, not a user error: the names come from this module
        raise AssertionError(f"llama2.c tensors do not match the model: missing {missing}, unexpected {unexpected}")
    return h, model.to(device).eval()
