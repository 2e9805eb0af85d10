"""A tokenizer made from llama2.c's tokenizer.bin alone, encoding and decoding as run.c does.

Encode: a dummy-prefix " " token when the text is not empty, one token per UTF-8 character when the
vocabulary has it, otherwise byte-fallback tokens <0xXX> at id byte + 3, then greedy merges of the
adjacent pair whose merged piece has the highest score (leftmost on ties) until none is left.
Decode: a leading space is dropped after BOS, <0xXX> pieces are raw bytes, control bytes other than
whitespace are skipped. Unlike run.c, bytes >= 0x80 are kept, so byte-fallback UTF-8 comes out whole.
The layout run.c assumes: unk 0, BOS 1, EOS 2, byte pieces at 3..258.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write_bytes
from toolkit.tokenizers.base import write_meta
from toolkit.tokenizers.llama2c_bin import read_tokenizer_bin

FILE = "tokenizer.bin"
_BYTE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    kind = "llama2c"

    def __init__(self, pieces: list[bytes], scores: list[float], raw: bytes):
        self.pieces = pieces
        self.scores = scores
        self.raw = raw  # the tokenizer.bin bytes for these pieces (what save() writes back)
        self.vocab_size = len(pieces)
        self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        # lookup of a piece's id; the first id wins on duplicates; unk/BOS/EOS are never made from text
        self.ids: dict[bytes, int] = {}
        for i in range(len(pieces) - 1, 2, -1):
            self.ids[pieces[i]] = i
        self.surface: list[bytes] = []  # what each id decodes to
        for p in pieces:
            m = _BYTE.match(p)
            self.surface.append(bytes([int(m.group(1), 16)]) if m else p)
        for i in (self.bos_id, self.eos_id):
            if i < len(self.surface):
                self.surface[i] = b""

    @classmethod
    def from_file(cls, path: Path, vocab_size: int) -> Llama2cTokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path} (give the model's tokenizer.bin with -z)")
        pieces, scores, _ = read_tokenizer_bin(path, vocab_size)
        if vocab_size < 259:
            raise UserError(f"{path}: a llama2.c vocabulary needs at least 259 tokens (unk, BOS, EOS, 256 bytes)")
        size = 4 + sum(8 + len(p) for p in pieces)
        return cls(pieces, scores, path.read_bytes()[:size])

    @classmethod
    def load(cls, folder: Path, vocab_size: int) -> Llama2cTokenizer:
        return cls.from_file(Path(folder) / FILE, vocab_size)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        atomic_write_bytes(folder / FILE, self.raw)
        write_meta(folder, self)

    # -- encoding --------------------------------------------------------------------------------------

    def _initial(self, text: str) -> list[int]:
        tokens = []
        space = self.ids.get(b" ")
        tokens.extend([space] if space is not None else [ord(" ") + 3])
        for ch in text:
            b = ch.encode("utf-8", errors="surrogatepass")
            i = self.ids.get(b)
            if i is not None:
                tokens.append(i)
            else:
                tokens.extend(x + 3 for x in b)
        return tokens

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        toks = self._initial(text)
        # Greedy BPE with a heap over a linked list: the same result as run.c's rescan-for-the-best-pair
        # loop (highest score first, leftmost on ties) in O(n log n).
        n = len(toks)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                merged = self.ids.get(self.pieces[toks[i]] + self.pieces[toks[j]])
                if merged is not None:
                    heapq.heappush(heap, (-self.scores[merged], i, toks[i], toks[j], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or toks[i] != left or toks[j] != right:
                continue  # stale: one side changed since this pair was pushed
            toks[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        out, i = [], 0
        while i < n:
            out.append(toks[i])
            i = nxt[i]
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    # -- decoding --------------------------------------------------------------------------------------

    def decode_bytes(self, ids, prev: int | None = None) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                continue
            piece = self.surface[i]
            if (prev == self.bos_id or prev is None) and piece.startswith(b" "):
                piece = piece[1:]  # sentencepiece's decoder drops the dummy-prefix space
            if len(piece) == 1 and piece[0] < 0x20 and piece not in (b"\n", b"\t", b"\r") or piece == b"\x7f":
                piece = b""
            out.append(piece)
            prev = i
        return b"".join(out)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for unk/BOS/EOS), for bits per byte."""
        n = np.array([len(s) for s in self.surface], dtype=np.int64)
        n[self.unk_id] = 0
        return n
