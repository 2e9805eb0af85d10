"""Make whatever of corpus -> tokenizer -> shards a recipe needs and is missing or stale.

Each product lives in a cache folder named by a hash of everything it depends on (the source's
files, sizes and mtimes; the [data] and [tokenizer] settings; the tokenizer's fingerprint), so a
changed input makes a new product and an unchanged one is reused across runs and seeds.
A folder of audio code files (`lmkit audio encode`) goes straight to shards with the audio tokenizer
(toolkit/shards/audio.py), with no corpus step.
Cache root: $LMKIT_CACHE, else ~/.cache/lmkit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from toolkit import tokenizers
from toolkit.console import info
from toolkit.errors import UserError
from toolkit.fsio import build_atomically


def cache_root() -> Path:
    return Path(os.environ.get("LMKIT_CACHE") or Path.home() / ".cache" / "lmkit")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_signature(source: str) -> list:
    """What identifies the source's content: for local paths every file's name, size and mtime."""
    if source == "synthetic" or source.startswith("hf:"):
        return [source]
    path = Path(source).expanduser()
    if path.is_file():
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return [str(path.resolve())] + [[p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                                        for p in sorted(path.rglob("*")) if p.is_file()]
    raise UserError(f"data source not found: {source} (set data.source, e.g. --set data.source=path/to/docs)")


@dataclass
class Prepared:
    corpus: Path | None
    tokenizer_dir: Path
    shards: Path
    tokenizer: object


def _shard_folder_for(source: str) -> Path | None:
    """A source that is already a shard folder (lmkit's, or llama2.c's .bin files) is used as it is."""
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "meta.json").is_file() or (any(path.glob("*.bin")) and not any(
            p.suffix in (".md", ".txt", ".jsonl") for p in path.iterdir()))):
        return path
    return None


def _is_codes_source(source: str) -> bool:
    """A folder holding .npz code files (from `lmkit audio encode`) and no text documents, or one .npz file."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix == ".npz"
    if not path.is_dir() or (path / "manifest.json").is_file():
        return False
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    return ".npz" in suffixes and not suffixes & {".md", ".txt", ".jsonl"}


def _prepare_codes(data, tcfg, root: Path) -> Prepared:
    """Audio code files -> the audio tokenizer (from [tokenizer]) and shards with per-file meta, both cached."""
    from toolkit.shards.audio import pretokenize_codes

    if tcfg.path:
        tok_dir = Path(tcfg.path)
        tok = tokenizers.load(tok_dir)
        if tok.kind != "audio":
            raise UserError(f"data.source {data.source} holds audio code files but tokenizer.path {tcfg.path} is a "
                            f"{tok.kind} tokenizer; use an audio one (`lmkit vocab --kind audio`)")
    else:
        if tcfg.kind != "audio":
            raise UserError(f"data.source {data.source} holds audio code files: set tokenizer.kind = \"audio\" "
                            f"(the recipe has {tcfg.kind!r})")
        tok_dir = root / "tokenizer" / _hash(["audio", dataclasses.asdict(tcfg)])
        if not (tok_dir / tokenizers.META_FILE).is_file():
            build_atomically(tok_dir, lambda tmp: tokenizers.build(tcfg, None, tmp))
        tok = tokenizers.load(tok_dir)
    # only the code files count: re-scoring (scores.parquet) does not change the shards
    signature = [e for e in source_signature(data.source) if not isinstance(e, list) or e[0].endswith(".npz")]
    shards_dir = root / "shards" / _hash(["audio-codes-v2", signature, tok.fingerprint, data.val_fraction,
                                          data.shard_tokens, tcfg.append_eos])
    if not (shards_dir / "meta.json").is_file():
        info(f"pretokenize: audio codes {data.source} -> {shards_dir}")
        build_atomically(shards_dir, lambda tmp: pretokenize_codes(
            Path(data.source).expanduser(), tok_dir, tmp, shard_tokens=data.shard_tokens,
            append_eos=tcfg.append_eos, overwrite=True, val_fraction=data.val_fraction))
    return Prepared(None, tok_dir, shards_dir, tok)


def prepare(recipe, quiet: bool = False) -> Prepared:
    from toolkit.data import build_corpus, iter_documents, read_manifest
    from toolkit.shards.format import ShardSet
    from toolkit.shards.pretokenize import pretokenize

    data, tcfg = recipe.data, recipe.tokenizer
    root = cache_root()
    shard_dir = _shard_folder_for(data.source)
    if shard_dir is not None:
        if not tcfg.path:
            raise UserError(f"{data.source} holds shards; name their tokenizer with tokenizer.path")
        tok = tokenizers.load(tcfg.path)
        ShardSet(shard_dir).check_tokenizer(tok)
        return Prepared(None, Path(tcfg.path), shard_dir, tok)

    if _is_codes_source(data.source):
        return _prepare_codes(data, tcfg, root)

    if data.chat_template:  # fine-tuning on conversations: tokens with a loss mask
        from toolkit.shards.pretokenize import pretokenize_conversations

        if not tcfg.path:
            raise UserError("training on conversations needs the base model's tokenizer: use --init-from RUN "
                            "(or set tokenizer.path)")
        tok = tokenizers.load(tcfg.path)
        sft_dir = root / "sft" / _hash([tok.fingerprint, source_signature(data.source), data.chat_template,
                                        data.val_fraction, data.shard_tokens])
        if not (sft_dir / "meta.json").is_file():
            info(f"pretokenize: conversations ({data.chat_template} template) -> {sft_dir}")
            pretokenize_conversations(Path(data.source), Path(tcfg.path), sft_dir, data.chat_template,
                                      data.val_fraction, data.shard_tokens, overwrite=True)
        return Prepared(None, Path(tcfg.path), sft_dir, tok)

    corpus_fields = {k: v for k, v in dataclasses.asdict(data).items()
                     if k not in ("shard_tokens", "sampling", "scores")}
    corpus_dir = root / "corpus" / _hash([corpus_fields, source_signature(data.source)])
    if not (corpus_dir / "manifest.json").is_file():
        info(f"data: collecting {data.source} -> {corpus_dir}")
        build_corpus(data, corpus_dir, overwrite=True)
    manifest = read_manifest(corpus_dir)

    if tcfg.path:
        tok_dir = Path(tcfg.path)
        tok = tokenizers.load(tok_dir)
    else:
        tok_dir = root / "tokenizer" / _hash([dataclasses.asdict(tcfg), manifest["sha256"]])
        if not (tok_dir / tokenizers.META_FILE).is_file():
            info(f"vocab: {tcfg.kind} tokenizer -> {tok_dir}")
            build_atomically(tok_dir, lambda tmp: tokenizers.build(tcfg, iter_documents(corpus_dir, "train"), tmp,
                                                                   quiet=quiet))
        tok = tokenizers.load(tok_dir)

    shards_dir = root / "shards" / _hash([tok.fingerprint, manifest["sha256"], data.shard_tokens, tcfg.append_eos])
    if not (shards_dir / "meta.json").is_file():
        info(f"pretokenize: -> {shards_dir}")
        build_atomically(shards_dir, lambda tmp: pretokenize(corpus_dir, tok_dir, tmp, shard_tokens=data.shard_tokens,
                                                             append_eos=tcfg.append_eos, overwrite=True))
    return Prepared(corpus_dir, tok_dir, shards_dir, tok)
