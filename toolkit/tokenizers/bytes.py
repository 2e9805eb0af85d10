"""Raw UTF-8 bytes: ids 0..255 are bytes, then pad, eos, bos and sentinels (for T5 span denoising)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from toolkit.tokenizers.base import write_meta


class BytesTokenizer:
    kind = "bytes"

    def __init__(self, n_sentinels: int = 100):
        self.n_sentinels = n_sentinels
        self.pad_id = 256
        self.eos_id = 257
        self.bos_id = 258
        self.sentinel_start = 259
        self.vocab_size = 259 + n_sentinels
        self.fingerprint = hashlib.sha256(f"bytes:v1:{n_sentinels}".encode()).hexdigest()[:16]

    def sentinel(self, k: int) -> int:
        if not 0 <= k < self.n_sentinels:
            raise IndexError(f"sentinel {k} out of range (have {self.n_sentinels})")
        return self.sentinel_start + k

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        arr = np.asarray(list(ids), dtype=np.int64)
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return (np.arange(self.vocab_size) < 256).astype(np.int64)

    def save(self, folder: Path) -> None:
        write_meta(Path(folder), self, n_sentinels=self.n_sentinels)
