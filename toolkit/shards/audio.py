"""A folder of code files -> llm.c shards with the audio tokenizer (what `lmkit pretokenize CODES_DIR` runs).

Train/val split by file: a stable hash of each file's name picks the val files (at least one, and at least one
file left for train); a single file is split by time instead (its last val_fraction of frames).
Each file's stream is BOS + tokens (+ EOS with append_eos), as the text path does per document.

meta.json's `audio` table says where each file lies in its split's token stream (the split's shards
concatenated), so a sampler can read windows at given frames (toolkit/audio/sampler.py):

  files[split] = [{"file": path relative to codes_dir (posix), "start": offset of the file's BOS in the stream,
                   "tokens": its tokens (BOS, codes, EOS if appended), "frames": f, "frame_offset": o}, ...]
  tokens_per_frame = 1 (codebook0) or K (flatten, delay)

Frame j of the file (j counted from frame_offset: the file's own frame o + j) begins at token
start + 1 + j * tokens_per_frame. For codebook0 and flatten that token is frame j's first (or only) code;
for delay it is step j, which holds codebook 0 of frame j (codebook k of frame j is at step j + k), and the
file has frames + K - 1 steps. frame_offset is 0 except for the val part of a single file split by time,
which starts at the file's frame `cut`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.shards.format import PretokenizeResult, ShardWriter, dtype_for, prepare_out_dir, shard_meta, write_meta


def split_files(paths: list[Path], val_fraction: float) -> dict[str, list[Path]]:
    """Val = the files whose name hashes lowest: stable when files are added, never an empty split."""
    if len(paths) < 2:
        raise ValueError("split_files needs at least two files")
    n_val = min(len(paths) - 1, max(1, round(len(paths) * val_fraction)))
    ranked = sorted(paths, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    val = set(ranked[:n_val])
    return {"train": [p for p in paths if p not in val], "val": [p for p in paths if p in val]}


def pretokenize_codes(codes_dir: Path, tokenizer_dir: Path, out_dir: Path, shard_tokens: int = 100_000_000,
                      append_eos: bool = False, overwrite: bool = False, val_fraction: float = 0.1
                      ) -> PretokenizeResult:
    from toolkit import console, tokenizers
    from toolkit.audio.codes import find_code_files, load_codes

    codes_dir, tokenizer_dir, out_dir = Path(codes_dir), Path(tokenizer_dir), Path(out_dir)
    tok = tokenizers.load(tokenizer_dir)
    if tok.kind != "audio":
        raise UserError(f"{codes_dir} holds audio code files but {tokenizer_dir} is a {tok.kind} tokenizer; make an "
                        "audio one with `lmkit vocab -o DIR --kind audio`")
    paths = find_code_files([codes_dir])
    base = codes_dir if codes_dir.is_dir() else codes_dir.parent  # file names in meta are relative to it
    prepare_out_dir(out_dir, overwrite)

    dtype = dtype_for(tok.vocab_size)
    prefix_id, suffix_id = tok.bos_id, (tok.eos_id if append_eos else None)
    writers = {s: ShardWriter(out_dir, s, shard_tokens, dtype) for s in ("train", "val")}
    stats = {s: {"files": 0, "frames": 0, "seconds": 0.0} for s in ("train", "val")}
    files = {"train": [], "val": []}  # each file's place in its split's stream
    offsets = {"train": 0, "val": 0}
    hashes = []
    t0 = time.perf_counter()

    def add(split: str, path: Path, codes: np.ndarray, frame_rate: float, frame_offset: int = 0) -> None:
        ids = tok.encode_codes(codes)
        parts = ([[prefix_id]] if prefix_id is not None else []) + [ids] + ([[suffix_id]] if suffix_id is not None else [])
        stream = np.concatenate(parts).astype(dtype)
        writers[split].add(stream)
        files[split].append({"file": path.relative_to(base).as_posix(), "start": offsets[split],
                             "tokens": len(stream), "frames": int(codes.shape[1]), "frame_offset": frame_offset})
        offsets[split] += len(stream)
        stats[split]["files"] += 1
        stats[split]["frames"] += codes.shape[1]
        stats[split]["seconds"] += codes.shape[1] / frame_rate

    with console.progress() as bar:
        task = bar.add_task("pretokenize codes", total=len(paths))
        if len(paths) == 1:
            cf = load_codes(paths[0])
            cut = int(round(cf.frames * (1 - val_fraction)))
            if cut < 1 or cut >= cf.frames:
                raise UserError(f"{paths[0]}: one file of {cf.frames} frames is too short to split into train and val")
            add("train", paths[0], cf.codes[:, :cut], cf.frame_rate)
            add("val", paths[0], cf.codes[:, cut:], cf.frame_rate, frame_offset=cut)
            hashes.append(cf.sha256)
            bar.advance(task)
        else:
            splits = split_files(paths, val_fraction)
            for split in ("train", "val"):
                for path in splits[split]:
                    cf = load_codes(path)
                    add(split, path, cf.codes, cf.frame_rate)
                    hashes.append(cf.sha256)
                    bar.advance(task)
    shards = {s: [p.name for p in w.close()] for s, w in writers.items()}
    totals = {s: w.total for s, w in writers.items()}
    meta = shard_meta(
        tok, dtype, totals, shards,
        documents={s: stats[s]["files"] for s in stats},
        chars={"train": 0, "val": 0},  # no text: bits per byte does not apply
        bytes={"train": 0, "val": 0},
        doc_prefix_id=prefix_id,
        doc_suffix_id=suffix_id,
        corpus={"path": str(codes_dir), "sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
                "source": "audio codes"},
        audio={"layout": tok.layout, "n_codebooks": tok.n_codebooks, "frames": {s: stats[s]["frames"] for s in stats},
               "seconds": {s: round(stats[s]["seconds"], 3) for s in stats},
               "codes_dir": str(base.resolve()), "tokens_per_frame": tok.n_codebooks, "files": files},
    )
    write_meta(out_dir, meta)
    return PretokenizeResult(out_dir, totals, time.perf_counter() - t0, meta)
