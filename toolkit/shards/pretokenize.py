"""Pretokenize: a corpus (or conversations, or llama2.c .bin files) -> shards, in worker processes."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write
from toolkit.shards.format import (
    PretokenizeResult,
    ShardWriter,
    dtype_for,
    headerless_splits,
    prepare_out_dir,
    read_header,
    shard_meta,
    write_meta,
    write_shard,
)

_worker_tok = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tok
    from toolkit import tokenizers

    _worker_tok = tokenizers.load(tokenizer_dir)


def encode_documents(tok, docs: list[str], prefix_id: int | None, suffix_id: int | None, dtype) -> np.ndarray:
    """Tokens of `docs`, each preceded by `prefix_id` (BOS / <|endoftext|>) and followed by `suffix_id`."""
    encoded = tok.encode_batch(docs)
    extra = (prefix_id is not None) + (suffix_id is not None)
    out = np.empty(sum(len(ids) for ids in encoded) + extra * len(encoded), dtype=dtype)
    pos = 0
    for ids in encoded:  # one slice assignment per document, not per token
        if prefix_id is not None:
            out[pos] = prefix_id
            pos += 1
        out[pos : pos + len(ids)] = ids
        pos += len(ids)
        if suffix_id is not None:
            out[pos] = suffix_id
            pos += 1
    return out


def _encode_in_worker(path, start, end, prefix_id, suffix_id, dtype):
    return encode_range(_worker_tok, path, start, end, prefix_id, suffix_id, dtype)


def encode_range(tok, path, start: int, end: int, prefix_id, suffix_id, dtype) -> tuple[np.ndarray, int]:
    """Read the JSONL lines in bytes [start, end) of `path`, encode them; returns (tokens, bytes read)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    docs = [row["text"] for row in json.loads(b"[" + raw.rstrip(b"\n").replace(b"\n", b",") + b"]")]
    return encode_documents(tok, docs, prefix_id, suffix_id, dtype), end - start


def line_ranges(path: Path, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes` that start and end on line boundaries."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()
            end = min(f.tell(), size)
            yield start, end
            start = end



def pretokenize(corpus_dir: Path, tokenizer_dir: Path, out_dir: Path, shard_tokens: int = 100_000_000,
                append_eos: bool = False, workers: int = 0, overwrite: bool = False,
                chunk_bytes: int = 1 << 20) -> PretokenizeResult:
    from rich.progress import TextColumn

    from toolkit import console, tokenizers
    from toolkit.data import read_manifest

    corpus_dir, tokenizer_dir, out_dir = Path(corpus_dir), Path(tokenizer_dir), Path(out_dir)
    manifest = read_manifest(corpus_dir)
    tok = tokenizers.load(tokenizer_dir)
    prepare_out_dir(out_dir, overwrite)
    dtype = dtype_for(tok.vocab_size)
    prefix_id = tok.bos_id
    suffix_id = tok.eos_id if append_eos else None
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    totals, shards = {}, {}
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) if workers > 1 else None
    try:
        with console.progress(TextColumn("{task.fields[rate]}")) as bar:
            for split in ("train", "val"):
                path = corpus_dir / f"{split}.jsonl"
                task = bar.add_task(f"pretokenize {split}", total=max(path.stat().st_size, 1), rate="")
                writer = ShardWriter(out_dir, split, shard_tokens, dtype)
                t_split = time.perf_counter()

                def consume(tokens, n_bytes, writer=writer, task=task, t_split=t_split):
                    writer.add(tokens)
                    rate = (writer.total + writer.filled) / max(time.perf_counter() - t_split, 1e-9)
                    bar.update(task, advance=n_bytes, rate=f"{rate:,.0f} tok/s")

                ranges = line_ranges(path, chunk_bytes)
                if pool is None:
                    for start, end in ranges:
                        consume(*encode_range(tok, path, start, end, prefix_id, suffix_id, dtype))
                else:  # workers read and encode; at most 2 chunks per worker in flight, so memory stays flat
                    pending = deque()
                    for start, end in ranges:
                        pending.append(pool.submit(_encode_in_worker, path, start, end, prefix_id, suffix_id, dtype))
                        if len(pending) >= 2 * workers:
                            consume(*pending.popleft().result())
                    while pending:
                        consume(*pending.popleft().result())
                shards[split] = [p.name for p in writer.close()]
                totals[split] = writer.total
    finally:
        if pool is not None:
            pool.shutdown()
    if totals["val"] == 0 or totals["train"] == 0:
        raise UserError("pretokenize produced an empty split; the corpus is too small")
    meta = shard_meta(tok, dtype, totals, shards, documents=manifest["documents"], chars=manifest["chars"],
                      bytes=manifest.get("bytes") or _split_bytes(corpus_dir), doc_prefix_id=prefix_id,
                      doc_suffix_id=suffix_id,
                      corpus={"path": str(corpus_dir), "sha256": manifest["sha256"], "source": manifest["source"]})
    write_meta(out_dir, meta)
    return PretokenizeResult(out_dir, totals, time.perf_counter() - t0, meta)


def _split_bytes(corpus_dir: Path) -> dict:
    """UTF-8 bytes of each split's text (for bits per byte), for corpora whose manifest lacks them."""
    from toolkit.data import iter_documents

    return {s: sum(len(d.encode("utf-8")) for d in iter_documents(corpus_dir, s)) for s in ("train", "val")}


def convert_llama2c(bin_dir: Path, out_dir: Path, vocab_size: int, tokenizer_meta: dict | None,
                    overwrite: bool = False) -> dict:
    """llama2.c's headerless uint16 .bin files -> lmkit shards (first sorted file = val, as llama2.c)."""
    files = sorted(Path(bin_dir).glob("*.bin"))
    if not files:
        raise UserError(f"{bin_dir}: no .bin files")
    out_dir = Path(out_dir)
    splits, rule = headerless_splits(files)
    prepare_out_dir(out_dir, overwrite)
    tokens, shards = {}, {}
    for split, parts in splits.items():
        shards[split], tokens[split] = [], 0
        for i, part in enumerate(parts):
            path = out_dir / f"{split}_{i:06d}.bin"
            write_shard(path, np.asarray(part, dtype=np.uint16))
            shards[split].append(path.name)
            tokens[split] += len(part)
    table = tokenizer_meta or {"kind": "unknown", "fingerprint": "", "vocab_size": vocab_size}
    meta = shard_meta({**table, "vocab_size": vocab_size}, np.uint16, tokens, shards,
                      source=f"llama2.c bins: {bin_dir}", split_rule=rule)
    write_meta(out_dir, meta)
    return meta


def pretokenize_conversations(conversations: Path, tokenizer_dir: Path, out_dir: Path, template: str,
                              val_fraction: float = 0.1, shard_tokens: int = 100_000_000,
                              overwrite: bool = False) -> dict:
    """Conversations JSONL -> shards plus a loss mask per token (`*.mask`, uint8, no header): 1 where the
    token is a target to learn (the assistant's tokens in the llama2 template; everything in "qa")."""
    from toolkit import tokenizers
    from toolkit.data.chat_template import encode_conversation
    from toolkit.data.conversations import read_conversations

    tok = tokenizers.load(tokenizer_dir)
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    convs = list(read_conversations(conversations))
    if not convs:
        raise UserError(f"{conversations}: no conversations")
    k = max(2, round(1.0 / val_fraction))
    splits = {"train": [c for i, c in enumerate(convs) if i % k != k - 1],
              "val": [c for i, c in enumerate(convs) if i % k == k - 1]}
    if not splits["val"]:  # too few conversations: the last one is held out, or shared when it is the only one
        splits["val"] = convs[-1:]
        splits["train"] = convs[:-1] or convs
    dtype = dtype_for(tok.vocab_size)
    meta = shard_meta(tok, dtype, {}, {}, loss_mask=True, chat_template=template, documents={}, target_tokens={},
                      source=str(conversations))
    for split, items in splits.items():
        ids, mask = [], []
        for conv in items:
            try:
                i, m = encode_conversation(tok, conv, template)
            except ValueError as e:
                raise UserError(f"{conversations}: {e}") from None
            ids += i
            mask += m
        tokens, masks = np.array(ids, dtype=dtype), np.array(mask, dtype=np.uint8)
        writer = ShardWriter(out_dir, split, shard_tokens, dtype)
        writer.add(tokens)
        paths = writer.close()
        for p in paths:  # the mask files follow the token shards one to one
            n = read_header(p)[1]
            atomic_write(p.with_suffix(".mask"), lambda tmp, m=masks[:n]: m.tofile(tmp))
            masks = masks[n:]
        meta["shards"][split] = [p.name for p in paths]
        meta["tokens"][split] = writer.total
        meta["documents"][split] = len(items)
        meta["target_tokens"][split] = int(np.array(mask).sum())
    write_meta(out_dir, meta)
    return meta
