"""Pretokenized shards on disk, and the batch sampler that reads them.

Layout (llm.c / modded-nanogpt): a header of 256 int32 — magic 20240520, version, token count —
then the tokens: version 1 = uint16, version 2 = uint32 (vocabularies over 65,536). Files are
`train_000000.bin, ...` and `val_000000.bin`, with `meta.json` beside them. llama2.c's headerless
uint16 `.bin` files are read too (the first sorted file is val, as llama2.c's loader does).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.errors import UserError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPE = {1: np.uint16, 2: np.uint32}
META = "meta.json"


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_header(n_tokens: int, dtype) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0] = MAGIC
    header[1] = 1 if np.dtype(dtype) == np.uint16 else 2
    header[2] = n_tokens
    return header


def write_shard(path: Path, tokens: np.ndarray) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(shard_header(len(tokens), tokens.dtype).tobytes())
        f.write(tokens.tobytes())
    tmp.replace(path)


def read_header(path: Path) -> tuple[int, int] | None:
    """(version, token count) for an llm.c shard, None for a file without the magic."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12:
        return None
    magic, version, count = np.frombuffer(head, dtype=np.int32)
    return (int(version), int(count)) if magic == MAGIC else None


def open_shard(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (llm.c header, or llama2.c's headerless uint16)."""
    path = Path(path)
    size = path.stat().st_size
    header = read_header(path)
    if header is None:
        if size % 2:
            raise UserError(f"{path}: neither an llm.c shard (no magic {MAGIC}) nor headerless uint16 tokens")
        return np.memmap(path, dtype=np.uint16, mode="r")
    version, count = header
    if version not in VERSION_DTYPE:
        raise UserError(f"{path}: unknown shard version {version}")
    dtype = VERSION_DTYPE[version]
    expected = HEADER_BYTES + count * np.dtype(dtype).itemsize
    if size != expected:
        raise UserError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes "
                        "(truncated or still being written?)")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardWriter:
    """Streams tokens into numbered shard files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = Path(out_dir), split, shard_tokens, dtype
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, self.buffer[: self.filled])
        self.paths.append(path)
        self.total += self.filled
        self.filled = 0

    def close(self) -> list[Path]:
        self._flush()
        return self.paths


def shard_meta(tok, dtype, tokens: dict, shards: dict, **extra) -> dict:
    """meta.json beside the shards: what the trainer checks (tokenizer fingerprint) and reports."""
    return {"format": "llm.c shards", "magic": MAGIC, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
            "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
            "tokens": tokens, "shards": shards, **extra}


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """A shard folder to write into: existing shards are replaced only when asked (--force)."""
    if (out_dir / META).exists() and not overwrite:
        raise UserError(f"{out_dir} already holds shards; remove it or pass --force to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train_*.bin"), *out_dir.glob("val_*.bin"), *out_dir.glob("*.mask"), out_dir / META]:
        old.unlink(missing_ok=True)


def write_meta(out_dir: Path, meta: dict) -> None:
    (Path(out_dir) / META).write_text(json.dumps(meta, indent=2) + "\n")


# --- pretokenize: documents -> shards, in worker processes --------------------------------------

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


@dataclass
class PretokenizeResult:
    out_dir: Path
    tokens: dict
    seconds: float
    meta: dict


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


def llama2c_splits(arrays: list[np.ndarray]) -> dict:
    """llama2.c's convention: the first file is val, the rest train; one file is split 90/10 by tokens."""
    if len(arrays) == 1:
        cut = int(len(arrays[0]) * 0.9)
        return {"train": [arrays[0][:cut]], "val": [arrays[0][cut:]]}
    return {"train": arrays[1:], "val": arrays[:1]}


def convert_llama2c(bin_dir: Path, out_dir: Path, vocab_size: int, tokenizer_meta: dict | None,
                    overwrite: bool = False) -> dict:
    """llama2.c's headerless uint16 .bin files -> lmkit shards (first sorted file = val, as llama2.c)."""
    files = sorted(Path(bin_dir).glob("*.bin"))
    if not files:
        raise UserError(f"{bin_dir}: no .bin files")
    if (Path(out_dir) / META).exists() and not overwrite:
        raise UserError(f"{out_dir} already holds shards; remove it or pass --force to replace them")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    splits = llama2c_splits([open_shard(f) for f in files])
    meta = {"format": "llm.c shards", "magic": MAGIC, "dtype": "uint16", "vocab_size": vocab_size,
            "tokenizer": tokenizer_meta or {"kind": "unknown", "fingerprint": "", "vocab_size": vocab_size},
            "tokens": {}, "shards": {}, "source": f"llama2.c bins: {bin_dir}"}
    for split, parts in splits.items():
        meta["shards"][split], meta["tokens"][split] = [], 0
        for i, part in enumerate(parts):
            path = Path(out_dir) / f"{split}_{i:06d}.bin"
            write_shard(path, np.asarray(part, dtype=np.uint16))
            meta["shards"][split].append(path.name)
            meta["tokens"][split] += len(part)
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
            masks[:n].tofile(p.with_suffix(".mask"))
            masks = masks[n:]
        meta["shards"][split] = [p.name for p in paths]
        meta["tokens"][split] = writer.total
        meta["documents"][split] = len(items)
        meta["target_tokens"][split] = int(np.array(mask).sum())
    write_meta(out_dir, meta)
    return meta


# --- reading: the shard set and the batch sampler ------------------------------------------------


class ShardSet:
    """The train and val token streams of a shard folder, memory-mapped (with loss masks for chat data)."""

    masks: dict | None = None

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"shard folder not found: {folder} (make it with `lmkit pretokenize`)")
        meta_path = self.folder / META
        if meta_path.is_file():
            self.meta = json.loads(meta_path.read_text())
            self.splits = {s: [open_shard(self.folder / n) for n in self.meta["shards"][s]] for s in ("train", "val")}
            if self.meta.get("loss_mask"):
                self.masks = {s: [np.memmap((self.folder / n).with_suffix(".mask"), dtype=np.uint8, mode="r")
                                  for n in self.meta["shards"][s]] for s in ("train", "val")}
        else:  # a folder of llama2.c .bin files
            files = sorted(self.folder.glob("*.bin"))
            if not files:
                raise UserError(f"{folder}: no shards (no meta.json and no .bin files)")
            self.splits = llama2c_splits([open_shard(f) for f in files])
            self.meta = {"tokenizer": {"kind": "unknown", "fingerprint": ""}, "vocab_size": 0,
                         "tokens": {s: int(sum(len(a) for a in v)) for s, v in self.splits.items()}}
        for split in ("train", "val"):
            if not self.splits[split] or sum(len(a) for a in self.splits[split]) == 0:
                raise UserError(f"{folder}: the {split} split is empty")

    @property
    def fingerprint(self) -> str:
        return self.meta.get("tokenizer", {}).get("fingerprint", "")

    def tokens(self, split: str) -> int:
        return int(sum(len(a) for a in self.splits[split]))

    def bytes_per_token(self, split: str = "val") -> float | None:
        b = self.meta.get("bytes", {}).get(split)
        return b / self.tokens(split) if b else None

    def check_tokenizer(self, tok) -> None:
        if self.fingerprint and self.fingerprint != tok.fingerprint:
            raise UserError(f"{self.folder} was made with a different tokenizer (fingerprint {self.fingerprint}, "
                            f"this run's is {tok.fingerprint}); re-run `lmkit pretokenize` with this tokenizer")


def gather(arrays: list[np.ndarray], which: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """Rows arrays[which[i]][offsets[i] : offsets[i] + length] as one int64 array (vectorised per shard)."""
    out = np.empty((len(offsets), length), dtype=np.int64)
    steps = np.arange(length)
    for s in np.unique(which):
        rows = np.nonzero(which == s)[0]
        out[rows] = arrays[s][offsets[rows, None] + steps]
    return out


class BatchSampler:
    """Random (input, target) windows of seq_len + 1 tokens from a split.

    The random state is a numpy PCG64 whose state goes into the checkpoint, so a resumed run draws
    the same batches. Under DDP every rank advances the same stream and keeps its own micro-batches,
    so the global batch equals a single-process run's.
    """

    def __init__(self, shards: ShardSet, split: str, seq_len: int, batch_size: int, seed: int):
        keep = [i for i, a in enumerate(shards.splits[split]) if len(a) > seq_len + 1]
        self.arrays = [shards.splits[split][i] for i in keep]
        self.masks = [shards.masks[split][i] for i in keep] if shards.masks else None
        if not self.arrays:
            longest = max(len(a) for a in shards.splits[split])
            raise UserError(f"the {split} split has no shard longer than seq_len + 1 = {seq_len + 1} tokens "
                            f"(longest: {longest}); use a shorter max_seq_len or more data")
        self.seq_len, self.batch_size = seq_len, batch_size
        sizes = np.array([len(a) - seq_len - 1 for a in self.arrays], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """Where the next batch's windows start: (shard index, offset) per row. Advances the stream."""
        which = self.rng.choice(len(self.arrays), size=self.batch_size, p=self.weights)
        limits = np.array([len(a) - self.seq_len - 1 for a in self.arrays])[which]
        offsets = (self.rng.random(self.batch_size) * (limits + 1)).astype(np.int64)
        return which, offsets

    def read(self, which: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = gather(self.arrays, which, offsets, self.seq_len + 1)
        x, y = rows[:, :-1], rows[:, 1:].copy()
        if self.masks is not None:
            y[gather(self.masks, which, offsets + 1, self.seq_len) == 0] = -1  # not a target: ignored by the loss
        return x, y

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        return self.read(*self.draw())

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def eval_windows(shards: ShardSet, split: str, seq_len: int, batch_size: int, max_batches: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows from the start of the split, the same for every run and model."""
    which, offsets = [], []
    for s, a in enumerate(shards.splits[split]):
        n = (len(a) - 1) // seq_len
        which.extend([s] * n)
        offsets.extend(range(0, n * seq_len, seq_len))
    if not offsets:
        raise UserError(f"the {split} split has fewer than seq_len + 1 = {seq_len + 1} tokens")
    which_a, offsets_a = np.array(which), np.array(offsets, dtype=np.int64)
    n_windows = min(len(offsets_a), batch_size * max_batches)
    for start in range(0, n_windows, batch_size):
        sl = slice(start, min(start + batch_size, n_windows))
        rows = gather(shards.splits[split], which_a[sl], offsets_a[sl], seq_len + 1)
        y = rows[:, 1:].copy()
        if shards.masks:
            y[gather(shards.masks[split], which_a[sl], offsets_a[sl] + 1, seq_len) == 0] = -1
        yield rows[:, :-1], y
