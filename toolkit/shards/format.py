"""The shard format on disk: llm.c's header and meta.json, and the shard set a trainer reads.

Layout (llm.c / modded-nanogpt): a header of 256 int32 — magic 20240520, version, token count —
then the tokens: version 1 = uint16, version 2 = uint32 (vocabularies over 65,536). Files are
`train_000000.bin, ...` and `val_000000.bin`, with `meta.json` beside them. llama2.c's headerless
uint16 `.bin` files are read too (the first sorted file is val, as llama2.c's loader does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write, atomic_write_json

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPE = {1: np.uint16, 2: np.uint32}
META = "meta.json"


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_header(n_tokens: int, dtype) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0] = MAGIC
    header[1] = 1 if np.dtype(dtype) == np.uint16 else 2
    header[2] = n_tokens
    return header


def write_shard(path: Path, tokens: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(shard_header(len(tokens), tokens.dtype).tobytes())
            f.write(tokens.tobytes())

    atomic_write(path, write)


def read_header(path: Path) -> tuple[int, int] | None:
    """(version, token count) for an llm.c shard, None for a file without the magic."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12:
        return None
    magic, version, count = np.frombuffer(head, dtype=np.int32)
    return (int(version), int(count)) if magic == MAGIC else None


def open_shard(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (llm.c header, or llama2.c's headerless uint16)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shard file not found: {path}")
    size = path.stat().st_size
    header = read_header(path)
    if header is None:
        if size % 2:
            raise UserError(f"{path}: neither an llm.c shard (no magic {MAGIC}) nor headerless uint16 tokens")
        if size == 0:  # numpy cannot memory-map an empty file
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(path, dtype=np.uint16, mode="r")
    version, count = header
    if version not in VERSION_DTYPE:
        raise UserError(f"{path}: unknown shard version {version}")
    dtype = VERSION_DTYPE[version]
    expected = HEADER_BYTES + count * np.dtype(dtype).itemsize
    if size != expected:
        raise UserError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes "
                        "(truncated or still being written?)")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardWriter:
    """Streams tokens into numbered shard files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = Path(out_dir), split, shard_tokens, dtype
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, self.buffer[: self.filled])
        self.paths.append(path)
        self.total += self.filled
        self.filled = 0

    def close(self) -> list[Path]:
        self._flush()
        return self.paths


def shard_meta(tok, dtype, tokens: dict, shards: dict, **extra) -> dict:
    """meta.json beside the shards: what the trainer checks (tokenizer fingerprint) and reports.

    `tok` is a tokenizer, or the tokenizer table itself (a dict with kind, fingerprint and vocab_size) where
    there is no tokenizer object (llama2.c .bin files converted with their tokenizer.json, or none)."""
    table = tok if isinstance(tok, dict) else {"kind": tok.kind, "fingerprint": tok.fingerprint,
                                               "vocab_size": tok.vocab_size}
    return {"format": "llm.c shards", "magic": MAGIC, "dtype": np.dtype(dtype).name, "vocab_size": table["vocab_size"],
            "tokenizer": table, "tokens": tokens, "shards": shards, **extra}


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """A shard folder to write into: existing shards are replaced only when asked (--force)."""
    if (out_dir / META).exists() and not overwrite:
        raise UserError(f"{out_dir} already holds shards; remove it or pass --force to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train_*.bin"), *out_dir.glob("val_*.bin"), *out_dir.glob("*.mask"), out_dir / META]:
        old.unlink(missing_ok=True)


def write_meta(out_dir: Path, meta: dict) -> None:
    atomic_write_json(Path(out_dir) / META, meta)


@dataclass
class PretokenizeResult:
    out_dir: Path
    tokens: dict
    seconds: float
    meta: dict


def llama2c_splits(arrays: list[np.ndarray]) -> dict:
    """llama2.c's convention: the first file is val, the rest train; one file is split 90/10 by tokens."""
    if len(arrays) == 1:
        cut = int(len(arrays[0]) * 0.9)
        return {"train": [arrays[0][:cut]], "val": [arrays[0][cut:]]}
    return {"train": arrays[1:], "val": arrays[:1]}


NAME_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "val"}


def split_from_name(path: Path) -> str | None:
    """`train` or `val` when the file name says so (llm.c, modded-nanogpt, attn_demo: tinystories_val_000000.bin)."""
    words = [w for w in re.split(r"[^a-z]+", Path(path).stem.lower()) if w]
    found = {NAME_SPLITS[w] for w in words if w in NAME_SPLITS}
    return found.pop() if len(found) == 1 else None


def headerless_splits(files: list[Path]) -> tuple[dict, str]:
    """The splits of a folder of .bin files without meta.json, and the rule that chose them: the file names when
    they say train/val, else llama2.c's order (the first sorted file is val)."""
    named = [split_from_name(f) for f in files]
    if any(named):
        unnamed = [f.name for f, n in zip(files, named) if n is None]
        if unnamed:
            raise UserError(f"{files[0].parent}: {', '.join(unnamed[:3])} say(s) neither train nor val while other "
                            "files do; rename them, or add a meta.json")
        splits = {s: [open_shard(f) for f, n in zip(files, named) if n == s] for s in ("train", "val")}
        return splits, "split by file name (train/val)"
    return llama2c_splits([open_shard(f) for f in files]), "llama2.c's order: the first sorted file is val"


def read_shard_meta(path: Path) -> dict:
    """A shard folder's meta.json, checked for what ShardSet reads: shards.train/val lists of file names."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # recursion: nested too deeply
        raise UserError(f"{path}: not valid JSON ({e}); re-run `lmkit pretokenize`") from None
    shards = meta.get("shards") if isinstance(meta, dict) else None
    if not isinstance(shards, dict) or not all(
            isinstance(shards.get(s), list) and all(isinstance(n, str) and n for n in shards[s]) for s in ("train", "val")):
        raise UserError(f"{path}: expected a JSON object whose 'shards' lists the train and val file names; "
                        "re-run `lmkit pretokenize`")
    table = meta.get("tokenizer", {})
    if not isinstance(table, dict) or not isinstance(table.get("fingerprint", ""), str):
        raise UserError(f"{path}: 'tokenizer' should be a table with a string fingerprint (kind, fingerprint, "
                        "vocab_size)")
    return meta


def open_mask(shard: Path, n_tokens: int) -> np.ndarray:
    """The uint8 loss mask beside a shard: one byte per token."""
    path = Path(shard).with_suffix(".mask")
    if not path.is_file():
        raise UserError(f"loss mask not found: {path} (meta.json says the shards have loss masks)")
    size = path.stat().st_size
    if size != n_tokens:
        raise UserError(f"{path}: {size} bytes but its shard has {n_tokens} tokens (one mask byte per token)")
    return np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)


class ShardSet:
    """The train and val token streams of a shard folder, memory-mapped (with loss masks for chat data)."""

    masks: dict | None = None
    split_rule = "meta.json"  # how the split of each shard was known

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"shard folder not found: {folder} (make it with `lmkit pretokenize`)")
        meta_path = self.folder / META
        if meta_path.is_file():
            self.meta = read_shard_meta(meta_path)
            self.splits = {s: [open_shard(self.folder / n) for n in self.meta["shards"][s]] for s in ("train", "val")}
            if self.meta.get("loss_mask"):
                self.masks = {s: [open_mask(self.folder / n, len(a)) for n, a in zip(self.meta["shards"][s], arrays)]
                              for s, arrays in self.splits.items()}
        else:  # a folder of llama2.c .bin files
            files = sorted(self.folder.glob("*.bin"))
            if not files:
                raise UserError(f"{folder}: no shards (no meta.json and no .bin files)")
            self.splits, self.split_rule = headerless_splits(files)
            self.meta = {"tokenizer": {"kind": "unknown", "fingerprint": ""}, "vocab_size": 0,
                         "tokens": {s: int(sum(len(a) for a in v)) for s, v in self.splits.items()}}
        for split in ("train", "val"):
            if not self.splits[split] or sum(len(a) for a in self.splits[split]) == 0:
                raise UserError(f"{folder}: the {split} split is empty")

    @property
    def fingerprint(self) -> str:
        return self.meta.get("tokenizer", {}).get("fingerprint", "")

    def tokens(self, split: str) -> int:
        return int(sum(len(a) for a in self.splits[split]))

    def check_tokenizer(self, tok) -> None:
        if self.fingerprint and self.fingerprint != tok.fingerprint:
            raise UserError(f"{self.folder} was made with a different tokenizer (fingerprint {self.fingerprint}, "
                            f"this run's is {tok.fingerprint}); re-run `lmkit pretokenize` with this tokenizer")
