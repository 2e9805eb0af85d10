"""EnCodec codes as one token stream: codes (n_codebooks, frames) <-> ids, in one of three layouts.

  codebook0  the seed's: codebook 0 only, id = code (the other codebooks are dropped)
  flatten    frame-major, every codebook: [c0[t0], c1[t0], ..., cK-1[t0], c0[t1], ...], codebook k's codes
             offset by k * codebook_size (audiocraft's "unroll" pattern: K tokens per frame)
  delay      MusicGen's delay pattern, frame-major like flatten: codebook k is shifted right by k steps, so
             step s holds c0[s], c1[s-1], ..., cK-1[s-K+1]; the K-1 leading and trailing empty slots hold pad;
             K * (frames + K - 1) tokens

Specials come after the code ids (base = n_codebooks * codebook_size, 1024 for codebook0):
pad = base, eos = base + 1, sentinels base + 2 ... (the seed's T5 ids: pad 1024, eos 1025, sentinels from 1026),
then bos last. `--n-sentinels 1021` with codebook0 gives the seed's vocabulary of 2048.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.tokenizers.base import write_meta

LAYOUTS = ("codebook0", "flatten", "delay")


class AudioTokenizer:
    kind = "audio"

    def __init__(self, layout: str = "flatten", n_codebooks: int = 8, codebook_size: int = 1024,
                 n_sentinels: int = 100):
        if layout not in LAYOUTS:
            raise UserError(f"audio layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if not 1 <= n_codebooks <= 32 or not 2 <= codebook_size <= 32768:
            raise UserError("audio tokenizer: n_codebooks must be 1..32 and codebook_size 2..32768")
        self.layout = layout
        self.n_codebooks = 1 if layout == "codebook0" else n_codebooks
        self.codebook_size = codebook_size
        self.n_sentinels = n_sentinels
        base = self.n_codebooks * codebook_size
        self.pad_id = base
        self.eos_id = base + 1
        self.sentinel_start = base + 2
        self.bos_id = base + 2 + n_sentinels
        self.vocab_size = base + 3 + n_sentinels
        key = f"audio:v1:{layout}:{self.n_codebooks}:{codebook_size}:{n_sentinels}"
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    def sentinel(self, k: int) -> int:
        if not 0 <= k < self.n_sentinels:
            raise IndexError(f"sentinel {k} out of range (have {self.n_sentinels})")
        return self.sentinel_start + k

    # --- codes <-> ids ---------------------------------------------------------------------------

    def encode_codes(self, codes: np.ndarray) -> np.ndarray:
        """codes (n_codebooks or more, frames) -> 1-D int64 ids (extra codebooks are ignored)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] < self.n_codebooks:
            raise UserError(f"audio tokenizer ({self.layout}, {self.n_codebooks} codebooks): codes of shape "
                            f"{codes.shape} have too few codebooks")
        c = codes[: self.n_codebooks].astype(np.int64)
        if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
            raise UserError(f"audio tokenizer: codes outside 0..{self.codebook_size - 1}")
        k, t = c.shape
        offsets = np.arange(k, dtype=np.int64)[:, None] * self.codebook_size
        if self.layout == "codebook0":
            return c[0].copy()
        if self.layout == "flatten":
            return (c + offsets).T.reshape(-1)
        grid = np.full((k, t + k - 1), self.pad_id, dtype=np.int64)  # delay
        rows = np.arange(k)[:, None]
        grid[rows, rows + np.arange(t)] = c + offsets
        return grid.T.reshape(-1)

    def decode_codes(self, ids) -> np.ndarray:
        """ids -> codes (n_codebooks, frames), the exact inverse of encode_codes. bos/eos/sentinels are dropped
        first (a generated stream); a stream that does not fit the layout is a UserError."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        dropped = (ids == self.eos_id) | ((ids >= self.sentinel_start) & (ids < self.vocab_size))
        ids = ids[~dropped]  # eos, sentinels and bos
        k, size = self.n_codebooks, self.codebook_size
        if self.layout == "codebook0":
            ids = ids[ids != self.pad_id]
            return self._check_codes(ids[None, :], ids)
        if len(ids) % k:
            raise UserError(f"audio tokens: {len(ids)} is not a multiple of {k} codebooks ({self.layout} layout)")
        grid = ids.reshape(-1, k).T  # (k, steps)
        if self.layout == "flatten":
            return self._check_codes(grid - np.arange(k)[:, None] * size, grid)
        steps = grid.shape[1]
        t = steps - (k - 1)
        if t < 0:
            raise UserError(f"audio tokens: {steps} steps are fewer than the delay pattern's {k - 1}")
        rows = np.arange(k)[:, None]
        taken = grid[rows, rows + np.arange(t)]
        return self._check_codes(taken - rows * size, taken)

    def _check_codes(self, codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
        rows = np.arange(codes.shape[0])[:, None]
        bad = (ids < rows * self.codebook_size) | (ids >= (rows + 1) * self.codebook_size)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise UserError(f"audio tokens: id {int(ids[tuple(where)])} at step {int(where[1])} is not a code of "
                            f"codebook {int(where[0])} ({self.layout} layout)")
        return codes.astype(np.int16)

    # --- the text protocol ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        raise UserError("the audio tokenizer encodes EnCodec codes, not text: use encode_codes(codes) "
                        "(`lmkit audio encode` makes code files)")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encode("")

    def token_bytes(self) -> None:
        """Codes stand for no text: bits per byte does not apply."""
        return None

    def decode(self, ids) -> str:
        """A readable rendering: codebook:code for codes, <pad>/<eos>/<bos>/<s_k> for specials."""
        names = []
        for i in (int(x) for x in ids):
            if 0 <= i < self.pad_id:
                names.append(f"{i // self.codebook_size}:{i % self.codebook_size}")
            elif i == self.pad_id:
                names.append("<pad>")
            elif i == self.eos_id:
                names.append("<eos>")
            elif i == self.bos_id:
                names.append("<bos>")
            elif self.sentinel_start <= i < self.bos_id:
                names.append(f"<s_{i - self.sentinel_start}>")
            else:
                names.append(f"<unk:{i}>")
        return " ".join(names)

    def save(self, folder: Path) -> None:
        write_meta(Path(folder), self, layout=self.layout, n_codebooks=self.n_codebooks,
                   codebook_size=self.codebook_size, n_sentinels=self.n_sentinels, pad_id=self.pad_id,
                   sentinel_start=self.sentinel_start)
