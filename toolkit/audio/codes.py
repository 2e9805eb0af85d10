"""The code file: one `.npz` per audio file (numpy arrays only; read with allow_pickle=False).

Keys: `codes` int16 (n_codebooks, frames); 0-d arrays `sample_rate` (the codec's), `frame_rate`, `bandwidth`
(kbps), `num_samples` (audio length at sample_rate), `duration` (seconds), `codec` (hub name or folder),
`source` (the audio file's name), `source_path` (where it was when encoded), `sha256` (of the audio file).
The seed's files (`tokens`, `sample_rate`, `frame_rate`, `target_bandwidth`) load too.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write

REQUIRED = ("codes", "sample_rate", "frame_rate", "bandwidth", "num_samples", "duration", "codec", "source", "sha256")
SEED_KEYS = ("tokens", "sample_rate", "frame_rate", "target_bandwidth")
# what zipfile and zlib raise on a damaged archive: a corrupt compressed member (zlib.error), flags or a version
# it does not support (NotImplementedError), an "encrypted" member (RuntimeError, zipfile's documented choice)
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, OSError, EOFError)


@dataclass
class CodeFile:
    codes: np.ndarray  # int16 (n_codebooks, frames)
    sample_rate: int
    frame_rate: float
    bandwidth: float
    num_samples: int
    codec: str
    source: str
    sha256: str
    source_path: str = ""

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[0])

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def save_codes(path: str | Path, cf: CodeFile) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy adds no second .npz suffix
            np.savez_compressed(
                f, codes=np.asarray(cf.codes, dtype=np.int16), sample_rate=np.int64(cf.sample_rate),
                frame_rate=np.float64(cf.frame_rate), bandwidth=np.float64(cf.bandwidth),
                num_samples=np.int64(cf.num_samples), duration=np.float64(cf.duration), codec=np.str_(cf.codec),
                source=np.str_(cf.source), source_path=np.str_(cf.source_path), sha256=np.str_(cf.sha256))

    atomic_write(path, write)


def _scalar(data, key: str, path: Path, kind):
    value = data[key]
    if value.shape != ():
        raise UserError(f"{path}: {key!r} should be a single value, got shape {value.shape}")
    v = value.item()
    if kind is str:
        ok = value.dtype.kind == "U"
    else:  # no bools, strings or complex; an int key also takes a whole float (24000.0); nan and inf never
        ok = value.dtype.kind in "iuf" and math.isfinite(v) and (kind is float or float(v).is_integer())
    if not ok:
        what = {int: "an integer", float: "a finite number", str: "a string"}[kind]
        raise UserError(f"{path}: {key!r} should be {what}, got {v!r} ({value.dtype})")
    return kind(v)


def load_codes(path: str | Path) -> CodeFile:
    """Read and check a code file; every problem is a UserError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"code file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise UserError(f"{path}: not a code file (.npz from `lmkit audio encode`): not an .npz archive")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's message advises unpickling, which lmkit never does
        raise UserError(f"{path}: not a code file (.npz from `lmkit audio encode`)") from None
    except ZIP_ERRORS as e:
        raise UserError(f"{path}: not a code file (.npz from `lmkit audio encode`): {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: not a code file (.npz from `lmkit audio encode`): a single array")
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except ValueError:  # an object array: would need unpickling, which we never do
        raise UserError(f"{path}: holds pickled objects; code files hold numpy arrays only") from None
    except ZIP_ERRORS as e:
        raise UserError(f"{path}: not a code file (.npz from `lmkit audio encode`): {e}") from None
    if "tokens" in arrays and "codes" not in arrays and all(k in arrays for k in SEED_KEYS):
        return _from_seed(arrays, path)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}; re-encode it with `lmkit audio encode`")
    codes = _check_codes(arrays["codes"], path)
    cf = CodeFile(codes=codes, sample_rate=_scalar(arrays, "sample_rate", path, int),
                  frame_rate=_scalar(arrays, "frame_rate", path, float),
                  bandwidth=_scalar(arrays, "bandwidth", path, float),
                  num_samples=_scalar(arrays, "num_samples", path, int), codec=_scalar(arrays, "codec", path, str),
                  source=_scalar(arrays, "source", path, str), sha256=_scalar(arrays, "sha256", path, str),
                  source_path=_scalar(arrays, "source_path", path, str) if "source_path" in arrays else "")
    if cf.sample_rate <= 0 or cf.frame_rate <= 0 or cf.num_samples < 0:
        raise UserError(f"{path}: sample_rate and frame_rate must be positive, num_samples >= 0")
    expected = math.ceil(cf.num_samples * cf.frame_rate / cf.sample_rate)
    if abs(cf.frames - expected) > 1:
        raise UserError(f"{path}: 'codes' has {cf.frames} frames but {cf.num_samples} samples at "
                        f"{cf.frame_rate:g} Hz make {expected} (truncated or edited?)")
    return cf


def _check_codes(codes: np.ndarray, path: Path, key: str = "codes") -> np.ndarray:
    if codes.ndim != 2 or codes.shape[0] < 1:
        raise UserError(f"{path}: {key!r} should have shape (n_codebooks, frames), got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise UserError(f"{path}: {key!r} should hold integers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
        raise UserError(f"{path}: {key!r} holds values outside 0..32767")
    return codes.astype(np.int16, copy=False)


def _from_seed(arrays: dict, path: Path) -> CodeFile:
    """attn_demo's encodec_index.py output: `tokens` (8, frames) + rates; no source metadata."""
    codes = _check_codes(arrays["tokens"], path, "tokens")
    sr, fr = _scalar(arrays, "sample_rate", path, int), _scalar(arrays, "frame_rate", path, float)
    if sr <= 0 or fr <= 0:
        raise UserError(f"{path}: sample_rate and frame_rate must be positive")
    return CodeFile(codes=codes, sample_rate=sr, frame_rate=fr,
                    bandwidth=_scalar(arrays, "target_bandwidth", path, float),
                    num_samples=int(round(codes.shape[1] * sr / fr)), codec="facebook/encodec_24khz",
                    source="", sha256="")


def find_code_files(inputs: list[Path]) -> list[Path]:
    """The .npz files among `inputs` (files, or folders searched deeply), sorted within each folder."""
    found = []
    for inp in inputs:
        inp = Path(inp)
        if inp.is_file():
            found.append(inp)
        elif inp.is_dir():
            files = sorted(inp.rglob("*.npz"))
            if not files:
                raise UserError(f"{inp}: no .npz code files (make them with `lmkit audio encode`)")
            found.extend(files)
        else:
            raise UserError(f"not found: {inp}")
    return found
