"""The tokenizer protocol and the tokenizer.json beside every saved tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

from toolkit.errors import UserError
from toolkit.fsio import atomic_write_json


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: Path) -> None: ...

    # optional: token_bytes() -> np.ndarray, the UTF-8 bytes each id stands for (for bits per byte)


META_FILE = "tokenizer.json"


def write_meta(folder: Path, tok, **extra) -> None:
    meta = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "fingerprint": tok.fingerprint, **extra}
    atomic_write_json(Path(folder) / META_FILE, meta)


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a tokenizer folder (no {META_FILE}); make one with `lmkit vocab`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # recursion: nested too deeply
        raise UserError(f"{path}: not valid JSON ({e}); make the tokenizer again with `lmkit vocab`") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("kind", "fingerprint")):
        raise UserError(f"{path}: expected a JSON object with a string kind and fingerprint (edited or corrupt?)")
    return meta
