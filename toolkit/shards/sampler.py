"""Batch samplers over a shard set: random training windows (resumable, DDP-aware), fixed eval windows, and
audio windows drawn by priority (below).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.console import info
from toolkit.errors import UserError
from toolkit.shards.format import ShardSet


def gather(arrays: list[np.ndarray], which: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """Rows arrays[which[i]][offsets[i] : offsets[i] + length] as one int64 array (vectorised per shard)."""
    out = np.empty((len(offsets), length), dtype=np.int64)
    steps = np.arange(length)
    for s in np.unique(which):
        rows = np.nonzero(which == s)[0]
        out[rows] = arrays[s][offsets[rows, None] + steps]
    return out


def mask_targets(y: np.ndarray, masks: list[np.ndarray], which: np.ndarray, offsets: np.ndarray) -> None:
    """Targets whose loss-mask byte is 0 (chat prompts) become -1, which the loss ignores; in place."""
    y[gather(masks, which, offsets + 1, y.shape[1]) == 0] = -1


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
            mask_targets(y, self.masks, which, offsets)
        return x, y

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        return self.read(*self.draw())

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def metrics(self) -> dict:
        """Named figures of the sampler's own for the training log (a curriculum's state); none here."""
        return {}

    def status(self) -> str:
        return ""


def split_windows(shards: ShardSet, split: str, seq_len: int) -> list[int]:
    """How many non-overlapping windows of seq_len (+1 for the targets) each shard of `split` holds."""
    return [(len(a) - 1) // seq_len for a in shards.splits[split]]


def eval_windows(shards: ShardSet, split: str, seq_len: int, batch_size: int, max_batches: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows from the start of the split, the same for every run and model."""
    which, offsets = [], []
    for s, n in enumerate(split_windows(shards, split, seq_len)):
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
            mask_targets(y, shards.masks[split], which_a[sl], offsets_a[sl])
        yield rows[:, :-1], y


# --- priority sampling of audio windows ------------------------------------------------------------
# Training windows of audio tokens centred on scored chunks, drawn with probability ∝ priority.
#
# The seed's `IntelligentAudioDataLoader` drew chunk indices ∝ priority_score and centred a window on
# chunk * (total_tokens // rows), a derived chunk size that drifts. Here each chunk's place comes from the
# frame_start / frame_end stored in the scores Parquet (`lmkit audio score`) and each file's place in the
# split's token stream from the shards' meta.json (toolkit/shards/audio.py), so a window is centred on
# the chunk's middle frame exactly:
#
#   centre = the first token of the chunk's middle frame, (frame_start + frame_end) // 2
#   start  = centre - (seq_len + 1) // 2, moved down to a frame boundary (a multiple of tokens_per_frame
#            after the file's BOS), then clamped so the window lies inside the file's tokens (after its BOS)
#            and inside one shard; a file shorter than the window is clamped inside the shard instead.
#
# `PrioritySampler` has BatchSampler's interface (draw / read / next_batch / state / set_state) and a numpy
# PCG64 state, so a resumed run draws the same windows. `make_sampler` picks it or BatchSampler from
# the recipe's data.sampling.


def read_scores(path: Path) -> dict:
    """The columns of a scores Parquet a sampler needs: `paths` (each distinct file, resolved), `file` (each
    row's index into paths), frame_start, frame_end, priority_score."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"scores not found: {path} (make them with `lmkit audio score CODES -o {path}`, or set "
                        "data.scores)")
    try:
        table = pq.read_table(path, columns=["file", "frame_start", "frame_end", "priority_score"])
    except Exception as e:  # pyarrow raises ArrowInvalid / KeyError / OSError depending on the problem
        raise UserError(f"{path}: not a scores table from `lmkit audio score` ({str(e).splitlines()[0]})") from None
    files = table.column("file").combine_chunks().dictionary_encode()
    return {"paths": [os.path.normpath(path.resolve().parent / n) for n in files.dictionary.to_pylist()],
            "file": files.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            "frame_start": table.column("frame_start").to_numpy().astype(np.int64),
            "frame_end": table.column("frame_end").to_numpy().astype(np.int64),
            "priority_score": table.column("priority_score").to_numpy().astype(np.float64)}


def centred_starts(centre: np.ndarray, length: int, align0: np.ndarray, step: int, lo: np.ndarray,
                   hi: np.ndarray, outer_lo: np.ndarray, outer_hi: np.ndarray) -> np.ndarray:
    """Start offsets of windows of `length` tokens centred on `centre`, on a boundary align0 + k * step, inside
    [lo, hi); where [lo, hi) cannot hold an aligned window, clamped inside [outer_lo, outer_hi) (not aligned)."""
    want = align0 + (centre - length // 2 - align0) // step * step
    first = align0 - (align0 - lo) // step * step  # the first boundary >= lo
    last = align0 + (hi - length - align0) // step * step  # the last boundary whose window ends by hi
    fits = first <= last
    inner = np.clip(want, first, np.maximum(first, last))
    outer = np.clip(want, outer_lo, np.maximum(outer_lo, outer_hi - length))
    return np.where(fits, inner, outer)


class PrioritySampler(BatchSampler):
    """(input, target) windows of seq_len + 1 tokens centred on chunks drawn ∝ priority_score. Only `draw` differs
    from BatchSampler (reading, resume state and next_batch are its).

    Chunks come from the scores rows of the split's files only (a file of the other split, or the other part of
    a single file split by time, is ignored); a file of the split with no rows is never drawn from.
    """

    def __init__(self, shards: ShardSet, split: str, seq_len: int, batch_size: int, seed: int, scores: Path):
        audio = shards.meta.get("audio", {})
        if "files" not in audio:
            raise UserError(f"{shards.folder}: no per-file audio meta in meta.json; priority sampling needs shards "
                            "made from audio code files by this version of `lmkit pretokenize` (re-run it)")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.arrays = shards.splits[split]
        self.masks = None  # audio has no loss masks
        length = seq_len + 1
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        if sizes.max() < length:
            raise UserError(f"the {split} split has no shard longer than seq_len + 1 = {length} tokens "
                            f"(longest: {sizes.max()}); use a shorter max_seq_len or more data")
        bounds = np.concatenate([[0], np.cumsum(sizes)])  # shard s holds stream tokens [bounds[s], bounds[s+1])
        tpf = int(audio["tokens_per_frame"])
        codes_dir = Path(audio["codes_dir"])
        files = audio["files"][split]
        by_path = {os.path.normpath(codes_dir / f["file"]): i for i, f in enumerate(files)}

        table = read_scores(scores)
        index = np.array([by_path.get(p, -1) for p in table["paths"]], dtype=np.int64)[table["file"]]
        f_start = np.array([f["start"] for f in files], dtype=np.int64)
        f_tokens = np.array([f["tokens"] for f in files], dtype=np.int64)
        f_frames = np.array([f["frames"] for f in files], dtype=np.int64)
        f_offset = np.array([f.get("frame_offset", 0) for f in files], dtype=np.int64)
        has_bos = shards.meta.get("doc_prefix_id") is not None

        middle = (table["frame_start"] + table["frame_end"]) // 2 - f_offset[index]  # frame within the part
        keep = (index >= 0) & (middle >= 0) & (middle < f_frames[index])
        if not keep.any():
            raise UserError(f"no chunk in {scores} belongs to a {split} file of {codes_dir}: score that folder "
                            f"(`lmkit audio score {codes_dir} -o {scores}`) or set data.scores")
        missing = sorted(set(range(len(files))) - set(index[keep].tolist()))
        if missing:
            info(f"warning: {len(missing)} of {len(files)} {split} file(s) have no chunks in {scores} "
                 f"and are never drawn (e.g. {files[missing[0]]['file']})", style="yellow")
        file_of = index[keep]
        code0 = f_start[file_of] + has_bos  # the file's first code token (after its BOS)
        centre = code0 + middle[keep] * tpf
        end = f_start[file_of] + f_tokens[file_of]
        shard = self._home_shards(sizes, length)[np.searchsorted(bounds, centre, side="right") - 1]
        s_lo, s_hi = bounds[shard], bounds[shard + 1]
        start = centred_starts(centre, length, code0, tpf, np.maximum(code0, s_lo), np.minimum(end, s_hi), s_lo, s_hi)
        self.chunk_shard, self.chunk_offset = shard, start - s_lo  # where each chunk's window is read
        weights = table["priority_score"][keep].clip(0, None)
        self.weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights))
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @staticmethod
    def _home_shards(sizes: np.ndarray, length: int) -> np.ndarray:
        """For each shard, itself if it holds a window, else the nearest shard that does."""
        ok = np.nonzero(sizes >= length)[0]
        here = np.arange(len(sizes))
        return ok[np.abs(here[:, None] - ok[None, :]).argmin(axis=1)]

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """Where the next batch's windows start: (shard index, offset) per row. Advances the stream."""
        chunks = self.rng.choice(len(self.weights), size=self.batch_size, p=self.weights)
        return self.chunk_shard[chunks], self.chunk_offset[chunks]


def scores_path(recipe, shards: ShardSet) -> Path:
    """data.scores, else scores.parquet in the code folder the shards were made from (data.source)."""
    if recipe.data.scores:
        return Path(recipe.data.scores).expanduser()
    codes_dir = shards.meta.get("audio", {}).get("codes_dir")
    return Path(codes_dir or recipe.data.source).expanduser() / "scores.parquet"


def make_sampler(recipe, shards: ShardSet, split: str, seq_len: int, batch_size: int, seed: int,
                 objective: str = "next_token"):
    """PrioritySampler for data.sampling = "priority", else the plain BatchSampler; wrapped in the span-corruption
    sampler for a model whose objective is "span_corruption" (T5)."""
    base = _window_sampler(recipe, shards, split, seq_len, batch_size, seed)
    if objective == "span_corruption":
        from toolkit.shards.span_corruption import SpanCorruptionSampler, objective_for

        return SpanCorruptionSampler(base, objective_for(recipe.model, seed), recipe.train.grad_accum)
    return base


def _window_sampler(recipe, shards: ShardSet, split: str, seq_len: int, batch_size: int, seed: int):
    if recipe.data.sampling != "priority":
        return BatchSampler(shards, split, seq_len, batch_size, seed)
    if "files" not in shards.meta.get("audio", {}):
        raise UserError(f"data.sampling = \"priority\" needs shards made from audio code files; {shards.folder} has "
                        "no audio file meta (use sampling = \"uniform\", or data.source = a folder of code files)")
    return PrioritySampler(shards, split, seq_len, batch_size, seed, scores_path(recipe, shards))
