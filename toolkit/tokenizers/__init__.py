"""One tokenizer protocol, several kinds.

Every tokenizer has: `kind`, `encode(str) -> list[int]`, `encode_batch(list[str])`, `decode(ids)`,
`vocab_size`, `bos_id` / `eos_id` (or None), `fingerprint` (a hash that changes when the mapping
changes) and `save(dir)`; `load(dir)` reads any kind back from its folder (`tokenizer.json` says
which kind it is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from toolkit.errors import UserError
from toolkit.tokenizers.base import META_FILE, Tokenizer, read_meta, write_meta  # noqa: F401 (the package's API)


def load(folder: str | Path):
    folder = Path(folder)
    meta = read_meta(folder)
    kind = meta["kind"]
    if kind == "sentencepiece":
        from toolkit.tokenizers.sentencepiece import SentencePieceTokenizer

        tok = SentencePieceTokenizer.load(folder)
    elif kind == "tiktoken":
        from toolkit.tokenizers.tiktoken import TiktokenTokenizer

        tok = TiktokenTokenizer(meta["encoding"], meta.get("vocab_cap", 0), meta.get("cap_policy", "none"))
    elif kind == "bytes":
        from toolkit.tokenizers.bytes import BytesTokenizer

        tok = BytesTokenizer(meta.get("n_sentinels", 0))
    elif kind == "audio":
        from toolkit.tokenizers.audio import AudioTokenizer

        tok = AudioTokenizer(meta["layout"], meta["n_codebooks"], meta["codebook_size"], meta["n_sentinels"])
    elif kind == "llama2c":
        from toolkit.tokenizers.llama2c import Llama2cTokenizer

        tok = Llama2cTokenizer.load(folder, meta["vocab_size"])
    else:
        raise UserError(f"{folder}: unknown tokenizer kind {kind!r}")
    if tok.fingerprint != meta["fingerprint"]:
        raise UserError(f"{folder}: tokenizer files do not match their recorded fingerprint (edited or corrupt?)")
    return tok


def from_config(cfg) -> object:
    """A tokenizer that needs no training (tiktoken, bytes, audio) straight from a [tokenizer] table."""
    if cfg.kind == "tiktoken":
        from toolkit.tokenizers.tiktoken import TiktokenTokenizer

        return TiktokenTokenizer(cfg.encoding, cfg.vocab_cap, cfg.cap_policy)
    if cfg.kind == "bytes":
        from toolkit.tokenizers.bytes import BytesTokenizer

        return BytesTokenizer(cfg.n_sentinels)
    if cfg.kind == "audio":
        from toolkit.tokenizers.audio import AudioTokenizer

        return AudioTokenizer(cfg.layout, cfg.n_codebooks, cfg.codebook_size, cfg.n_sentinels)
    raise UserError(f"tokenizer kind {cfg.kind!r} must be trained or loaded from a folder")


def build(cfg, documents: Iterable[str] | None, out_dir: Path, quiet: bool = False):
    """Make the tokenizer a [tokenizer] table asks for and save it to `out_dir`."""
    if cfg.path:
        tok = load(cfg.path)
    elif cfg.kind == "sentencepiece":
        from toolkit.tokenizers.sentencepiece import train_sentencepiece

        if documents is None:
            raise UserError("training a sentencepiece vocabulary needs a corpus")
        tok = train_sentencepiece(documents, cfg.vocab_size, out_dir, max_sentences=cfg.max_sentences, quiet=quiet)
    else:
        tok = from_config(cfg)
    tok.save(out_dir)
    return tok
