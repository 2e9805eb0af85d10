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

# Each kind's constructor, written once. `get(name, default)` reads one setting, from a saved tokenizer.json
# (`load`) or from a recipe's [tokenizer] table (`from_config`); a default stands for folders saved before
# the setting existed.


def _tiktoken(get):
    from toolkit.tokenizers.tiktoken import TiktokenTokenizer

    return TiktokenTokenizer(get("encoding"), get("vocab_cap", 0), get("cap_policy", "none"))


def _bytes(get):
    from toolkit.tokenizers.bytes import BytesTokenizer

    return BytesTokenizer(get("n_sentinels", 0))


def _audio(get):
    from toolkit.tokenizers.audio import AudioTokenizer

    return AudioTokenizer(get("layout"), get("n_codebooks"), get("codebook_size"), get("n_sentinels"))


def _sentencepiece(folder: Path, meta: dict):
    from toolkit.tokenizers.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer.load(folder)


def _llama2c(folder: Path, meta: dict):
    from toolkit.tokenizers.llama2c import Llama2cTokenizer

    return Llama2cTokenizer.load(folder, _setting(meta, folder, "vocab_size"))


# the type of each setting a kind's constructor reads from tokenizer.json (bools are not ints here)
SETTING_TYPES = {"encoding": str, "vocab_cap": int, "cap_policy": str, "n_sentinels": int, "layout": str,
                 "n_codebooks": int, "codebook_size": int, "vocab_size": int}


def _setting(meta: dict, folder: Path, name: str, *default):
    """One setting of a saved tokenizer.json, type-checked; `default` stands in when it is missing."""
    if name not in meta:
        if default:
            return default[0]
        raise UserError(f"{Path(folder) / META_FILE}: missing {name!r} (edited or corrupt?)")
    value, want = meta[name], SETTING_TYPES.get(name, object)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise UserError(f"{Path(folder) / META_FILE}: {name!r} should be {want.__name__}, got {value!r}")
    return value


# kinds made from their settings alone (no files beyond tokenizer.json)
FROM_SETTINGS = {"tiktoken": _tiktoken, "bytes": _bytes, "audio": _audio}
# kinds whose vocabulary lives in files of the folder (trained, or given with tokenizer.path)
FROM_FILES = {"sentencepiece": _sentencepiece, "llama2c": _llama2c}


def load(folder: str | Path):
    folder = Path(folder)
    meta = read_meta(folder)
    kind = meta["kind"]
    if kind in FROM_SETTINGS:
        tok = FROM_SETTINGS[kind](lambda name, *default: _setting(meta, folder, name, *default))
    elif kind in FROM_FILES:
        tok = FROM_FILES[kind](folder, meta)
    else:
        raise UserError(f"{folder}: unknown tokenizer kind {kind!r}")
    if tok.fingerprint != meta["fingerprint"]:
        raise UserError(f"{folder}: tokenizer files do not match their recorded fingerprint (edited or corrupt?)")
    return tok


def from_config(cfg) -> object:
    """A tokenizer that needs no training (tiktoken, bytes, audio) straight from a [tokenizer] table."""
    if cfg.kind not in FROM_SETTINGS:
        raise UserError(f"tokenizer kind {cfg.kind!r} must be trained or loaded from a folder")
    return FROM_SETTINGS[cfg.kind](lambda name, *default: getattr(cfg, name, *default))


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
