"""Per-chunk features and a priority score, from the audio itself (the seed's `mformer_dataset.py --analyze_npz`).

A chunk is `chunk_frames` code frames (54 = half a 4/4 measure at 165 BPM, about 0.72 s), i.e. exactly
chunk_frames * hop samples, so chunk c covers codes[:, c*chunk_frames : (c+1)*chunk_frames]; the table stores
those frame offsets (the seed derived them from the row count and drifted). Features per chunk:

  rms_energy      sqrt(mean x^2)
  shape_flux      cosine DISTANCE between this chunk's mean magnitude spectrum and the previous chunk's.
                  (The seed's column of the same name is 1 - distance, i.e. a similarity, despite its comment.)
  magnitude_flux  mean |log spectrum - previous log spectrum|
  novelty         |EMA_fast(f) - EMA_slow(f)| of f = [rms, shape_flux / max, magnitude_flux / max],
                  spans of 5 and 125 chunks (about 4 s and 90 s), min-max normalised per file
  stability       mean cosine similarity of the chunk's spectrum to those of the chunks within +-4
  priority_score  w_n * novelty + w_s * (1 - stability)^2 (0.7 and 0.3), 0 for silent chunks
  silent          rms below -50 dBFS

Spectra: Hann windows of 256 samples every hop/2 (160 at 24 kHz) samples, so each chunk holds exactly
2 * chunk_frames windows; one vectorised FFT per block of chunks, no Python loop per chunk.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import UserError
from toolkit.fsio import atomic_write

EPS = 1e-8


@dataclass(frozen=True)
class ScoreConfig:
    chunk_frames: int = 54
    n_fft: int = 256  # the seed's nperseg: 129 frequency bins
    fast_span: int = 5  # chunks, EMA span (about 4 s at 54 frames)
    slow_span: int = 125  # chunks (about 90 s)
    stability_radius: int = 4  # neighbours on each side (about 6 s in all)
    novelty_weight: float = 0.7
    stability_weight: float = 0.3
    silence_db: float = -50.0

    def __post_init__(self):
        if self.chunk_frames < 1:
            raise UserError(f"--chunk-frames {self.chunk_frames}: expected a positive number of frames")
        if self.novelty_weight < 0 or self.stability_weight < 0:
            raise UserError("--weights: expected two non-negative numbers, e.g. 0.7,0.3")
        if self.fast_span < 1 or self.slow_span < 1 or self.stability_radius < 0:
            raise UserError("EMA spans must be >= 1 chunk and the stability radius >= 0")


def ema(x: np.ndarray, span: int) -> np.ndarray:
    """y[0] = x[0], y[t] = a x[t] + (1 - a) y[t-1] with a = 2 / (span + 1), along axis 0, as one convolution.

    Left-padding with x[0] makes the padding's weights add up to (1 - a)^t x[0], exactly the recursion's start;
    the kernel is cut where its weights fall below 1e-12."""
    a = 2.0 / (span + 1)
    if a >= 1.0:
        return x.astype(np.float64)
    length = max(1, math.ceil(math.log(1e-12) / math.log(1 - a)))
    kernel = a * (1 - a) ** np.arange(length)
    padded = np.concatenate([np.repeat(x[:1], length - 1, axis=0), x]).astype(np.float64)
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(x.shape[1])], axis=1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; two silent (zero) rows count as identical, one silent row as unlike."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cos = (a * b).sum(-1) / np.maximum(na * nb, EPS * EPS)
    quiet_a, quiet_b = na < EPS, nb < EPS
    return np.where(quiet_a & quiet_b, 1.0, np.where(quiet_a | quiet_b, 0.0, np.clip(cos, -1.0, 1.0)))


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def chunk_spectra(audio: np.ndarray, n_chunks: int, chunk_samples: int, step: int, n_fft: int,
                  block_chunks: int = 256) -> np.ndarray:
    """Mean magnitude spectrum of each chunk, (n_chunks, n_fft // 2 + 1). Window w of a chunk is centred at
    step * (w + 1/2) in it; the loop is over blocks of chunks (bounded memory), never over chunks."""
    per_chunk = chunk_samples // step
    total = n_chunks * chunk_samples
    left = n_fft // 2 - step // 2
    padded = np.zeros(left + total + n_fft, dtype=np.float32)
    padded[left : left + min(len(audio), total)] = audio[:total]
    window = np.hanning(n_fft + 2)[1:-1].astype(np.float32)  # periodic-like Hann without zero ends
    out = np.empty((n_chunks, n_fft // 2 + 1), dtype=np.float64)
    for c0 in range(0, n_chunks, block_chunks):
        c1 = min(n_chunks, c0 + block_chunks)
        seg = padded[c0 * chunk_samples : c1 * chunk_samples + n_fft]
        frames = np.lib.stride_tricks.sliding_window_view(seg, n_fft)[::step][: (c1 - c0) * per_chunk]
        mags = np.abs(np.fft.rfft(frames * window, axis=-1))
        out[c0:c1] = mags.reshape(c1 - c0, per_chunk, -1).mean(axis=1)
    return out


def score_audio(audio: np.ndarray, n_frames: int, hop: int, cfg: ScoreConfig = ScoreConfig()) -> dict:
    """Features of each chunk of `audio` (mono, at the codec's rate; frame f = samples [f*hop, (f+1)*hop))."""
    chunk_samples = cfg.chunk_frames * hop
    n_chunks = max(1, math.ceil(n_frames / cfg.chunk_frames))
    n_valid = min(len(audio), n_frames * hop)
    step = hop // 2 if hop % 2 == 0 else hop

    starts = np.arange(n_chunks) * chunk_samples
    sq = np.zeros(n_chunks * chunk_samples, dtype=np.float64)
    sq[:n_valid] = np.square(audio[:n_valid], dtype=np.float64)
    counts = np.clip(n_valid - starts, 1, chunk_samples)  # the last chunk may be partial
    rms = np.sqrt(sq.reshape(n_chunks, chunk_samples).sum(axis=1) / counts)

    spec = chunk_spectra(audio[:n_valid], n_chunks, chunk_samples, step, cfg.n_fft)
    shape_flux = np.zeros(n_chunks)
    magnitude_flux = np.zeros(n_chunks)
    if n_chunks > 1:
        shape_flux[1:] = 1.0 - _cosine(spec[1:], spec[:-1])
        log_spec = np.log(spec + 1e-6)
        magnitude_flux[1:] = np.abs(np.diff(log_spec, axis=0)).mean(axis=1)

    def by_max(x):
        return x / x.max() if x.max() > 0 else x

    features = np.stack([rms, by_max(shape_flux), by_max(magnitude_flux)], axis=1)
    novelty = _minmax(np.linalg.norm(ema(features, cfg.fast_span) - ema(features, cfg.slow_span), axis=1))

    sims, weights = np.zeros(n_chunks), np.zeros(n_chunks)
    for d in range(1, cfg.stability_radius + 1):  # a loop over offsets, each over all chunks at once
        if d >= n_chunks:
            break
        s = _cosine(spec[d:], spec[:-d])
        sims[d:] += s
        sims[:-d] += s
        weights[d:] += 1
        weights[:-d] += 1
    stability = np.where(weights > 0, sims / np.maximum(weights, 1), 1.0)

    silent = 20 * np.log10(rms + 1e-12) < cfg.silence_db
    priority = cfg.novelty_weight * novelty + cfg.stability_weight * (1.0 - stability) ** 2
    priority = np.where(silent, 0.0, np.clip(priority, 0.0, None))
    if not priority.any():
        priority = np.ones(n_chunks)  # nothing stands out: sample uniformly (as the seed does)

    frame_start = np.arange(n_chunks, dtype=np.int64) * cfg.chunk_frames
    return {
        "chunk": np.arange(n_chunks, dtype=np.int32),
        "frame_start": frame_start,
        "frame_end": np.minimum(frame_start + cfg.chunk_frames, n_frames),
        "rms_energy": rms,
        "shape_flux": shape_flux,
        "magnitude_flux": magnitude_flux,
        "novelty": novelty,
        "stability": stability,
        "priority_score": priority,
        "silent": silent,
    }


# --- code files -> one Parquet table ------------------------------------------------------------------


def audio_for_codes(cf, audio_dirs: list[Path], codec=None) -> np.ndarray:
    """The audio a code file was made from (checked by hash), else the codes decoded by `codec` if given."""
    from toolkit.audio.io import read_audio, sha256_file

    candidates = [Path(cf.source_path)] if cf.source_path else []
    for d in audio_dirs:
        candidates.append(Path(d) / cf.source)
        candidates.extend(sorted(Path(d).rglob(cf.source)) if cf.source else [])
    for path in candidates:
        if cf.source and path.is_file() and (not cf.sha256 or sha256_file(path) == cf.sha256):
            return read_audio(path, cf.sample_rate)
    if codec is not None:
        from toolkit.audio.codec import decode

        return decode(codec, cf.codes)[: cf.num_samples]
    where = f" (looked at {cf.source_path})" if cf.source_path else ""
    raise UserError(f"source audio {cf.source!r} not found{where}; pass --audio-dir DIR where it is, or --decode "
                    "to score the decoded codes")


def score_code_files(paths: list[Path], out: Path, cfg: ScoreConfig = ScoreConfig(), audio_dirs: list[Path] = (),
                     codec=None, overwrite: bool = False, on_file=None) -> dict:
    """Score every code file into one Parquet table, one row per (file, chunk). Returns a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toolkit.audio.codes import load_codes

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if out.suffix != ".parquet":
        raise UserError(f"-o {out}: expected a .parquet file name")
    tables = []
    for path in paths:
        cf = load_codes(path)
        hop = int(round(cf.sample_rate / cf.frame_rate))
        cols = score_audio(audio_for_codes(cf, list(audio_dirs), codec), cf.frames, hop, cfg)
        n = len(cols["chunk"])
        rel = os.path.relpath(Path(path).resolve(), out.resolve().parent)
        tables.append(pa.table({
            "file": pa.array([Path(rel).as_posix()] * n, pa.string()),
            "source": pa.array([cf.source] * n, pa.string()),
            **{k: cols[k] for k in ("chunk", "frame_start", "frame_end")},
            "chunk_frames": np.full(n, cfg.chunk_frames, dtype=np.int32),
            "start_seconds": cols["frame_start"] / cf.frame_rate,
            **{k: cols[k] for k in ("rms_energy", "shape_flux", "magnitude_flux", "novelty", "stability",
                                    "priority_score", "silent")},
        }))
        if on_file is not None:
            on_file(path, cf)
    table = pa.concat_tables(tables)
    table = table.replace_schema_metadata({"lmkit.score": json.dumps(asdict(cfg))})
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    return {"files": len(paths), "chunks": table.num_rows,
            "silent": int(np.asarray(table.column("silent")).sum())}
