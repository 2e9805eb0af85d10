"""llama2.c's tokenizer.bin: uint32 max_token_length, then per token float32 score, uint32 length, bytes.

The vocabulary size is not stored (run.c takes it from the model header). Pieces are written as
llama2.c's tokenizer.py does: '▁' becomes ' ', BOS is "\\n<s>\\n" and EOS "\\n</s>\\n".
"""

from __future__ import annotations

import struct
from pathlib import Path

from toolkit.errors import UserError
from toolkit.fsio import atomic_write_bytes


def _surface(piece: str, i: int, bos_id: int | None, eos_id: int | None) -> bytes:
    if i == bos_id:
        piece = "\n<s>\n"
    elif i == eos_id:
        piece = "\n</s>\n"
    return piece.replace("▁", " ").encode("utf-8")


def write_tokenizer_bin(path: Path, pieces: list[tuple[str, float]], bos_id: int | None, eos_id: int | None) -> None:
    encoded = [(_surface(p, i, bos_id, eos_id), score) for i, (p, score) in enumerate(pieces)]
    max_len = max(len(b) for b, _ in encoded)
    parts = [struct.pack("<I", max_len)]
    for b, score in encoded:
        parts.append(struct.pack("<fI", score, len(b)))
        parts.append(b)
    atomic_write_bytes(path, b"".join(parts))


def read_tokenizer_bin(path: Path, vocab_size: int) -> tuple[list[bytes], list[float], int]:
    """Read `vocab_size` entries: (pieces as bytes, scores, max_token_length)."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise UserError(f"{path}: too short to be a llama2.c tokenizer.bin")
    (max_len,) = struct.unpack_from("<I", data, 0)
    off, pieces, scores = 4, [], []
    for i in range(vocab_size):
        if off + 8 > len(data):
            raise UserError(f"{path}: truncated at token {i} of {vocab_size} (wrong tokenizer for this model?)")
        score, n = struct.unpack_from("<fI", data, off)
        off += 8
        if n > max_len or off + n > len(data):
            raise UserError(f"{path}: token {i} has a bad length {n}; not a llama2.c tokenizer.bin?")
        pieces.append(data[off : off + n])
        scores.append(score)
        off += n
    return pieces, scores, max_len
