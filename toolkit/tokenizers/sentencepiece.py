"""SentencePiece BPE trained with llama2.c's arguments, so run.c can use its tokenizer.bin."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from toolkit.errors import UserError
from toolkit.fsio import atomic_write_bytes
from toolkit.tokenizers.base import write_meta
from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, folder: Path) -> SentencePieceTokenizer:
        path = Path(folder) / "tokenizer.model"
        if not path.is_file():
            raise UserError(f"{folder}: missing tokenizer.model")
        return cls(path.read_bytes())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for control pieces), for bits per byte."""
        sp = self.sp
        return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                         else len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8")) for i in range(self.vocab_size)])

    def pieces(self) -> list[tuple[str, float]]:
        return [(self.sp.id_to_piece(i), self.sp.get_score(i)) for i in range(self.vocab_size)]

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        atomic_write_bytes(folder / "tokenizer.model", self.model_proto)
        write_tokenizer_bin(folder / "tokenizer.bin", self.pieces(), self.bos_id, self.eos_id)
        write_meta(folder, self)


@contextlib.contextmanager
def _stderr_to(path: Path):
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _training_lines(documents: Iterable[str], limit: int) -> Iterable[str]:
    n = 0
    for doc in documents:
        for line in doc.split("\n"):
            line = line.strip()
            if line:
                yield line
                n += 1
                if n >= limit:
                    return


def train_sentencepiece(documents: Iterable[str], vocab_size: int, out_dir: Path, max_sentences: int = 2_000_000,
                        quiet: bool = False) -> SentencePieceTokenizer:
    """BPE with llama2.c's tinystories.py arguments: byte fallback, split digits, identity normalisation,
    character coverage 1.0, unk 0 / BOS 1 / EOS 2."""
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "train.txt"
        n_lines = 0
        with open(text_file, "w", encoding="utf-8") as f:
            for line in _training_lines(documents, max_sentences):
                f.write(line + "\n")
                n_lines += 1
        if n_lines == 0:
            raise UserError("cannot train a vocabulary on an empty corpus")
        prefix = Path(tmp) / "tok"
        log = Path(tmp) / "log.txt"
        try:
            with _stderr_to(log):  # sentencepiece's C++ logging would flood the terminal
                spm.SentencePieceTrainer.train(
                    input=str(text_file),
                    model_prefix=str(prefix),
                    model_type="bpe",
                    vocab_size=vocab_size,
                    self_test_sample_size=0,
                    input_format="text",
                    character_coverage=1.0,
                    num_threads=os.cpu_count() or 1,
                    split_digits=True,
                    allow_whitespace_only_pieces=True,
                    byte_fallback=True,
                    unk_surface=r" \342\201\207 ",
                    normalization_rule_name="identity",
                    max_sentence_length=1 << 16,
                    minloglevel=1,
                )
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            if "Vocabulary size too high" in msg:
                most = msg.rsplit("<=", 1)[-1].strip(" .")
                msg = f"this corpus supports at most {most} tokens (use a smaller vocab size or a larger corpus)"
            elif "smaller than required_chars" in msg:
                need = re.search(r"(\d+) vs (\d+)", msg)
                msg = (f"the corpus has more distinct characters than fit; use a vocab size of at least "
                       f"{int(need.group(2)) + 1 if need else 'more'}")
            raise UserError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {msg}") from None
        return SentencePieceTokenizer(Path(f"{prefix}.model").read_bytes())
