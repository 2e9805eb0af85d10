"""Audio benchmark: EnCodec encode/decode real-time factors and scoring time, printed as JSON.

    python benchmarks/audio.py                      # a synthetic 60 s clip
    python benchmarks/audio.py music/*.ogg song.wav # real files (each whole)
    python benchmarks/audio.py --codec DIR ...      # a pretrained codec instead of random weights

The codec is the full-size 24 kHz EnCodec layout (14.9 M parameters) with random weights, so nothing is
downloaded; its codebooks are seeded from the first clip so the codes vary as real ones do (speed does not
depend on the weights). rtf = compute seconds / audio seconds (below 1 is faster than real time);
x_realtime = its inverse.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.audio import codec as codec_lib
from toolkit.audio.io import read_audio
from toolkit.audio.score import score_audio


def synthetic_music(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """Notes, chords and noise bursts with a 2 s silence in the middle."""
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < seconds * sr:
        length = int(rng.uniform(0.15, 0.8) * sr)
        t = np.arange(length) / sr
        freqs = rng.uniform(80, 1000, rng.integers(1, 4))
        note = sum(np.sin(2 * np.pi * f * t) for f in freqs) / len(freqs) * np.exp(-3 * t)
        if rng.random() < 0.3:
            note = note + 0.5 * rng.standard_normal(length) * np.exp(-20 * t)
        out.append(0.3 * note)
        n += length
    audio = np.concatenate(out)[: int(seconds * sr)].astype(np.float32)
    mid = len(audio) // 2
    audio[mid : mid + 2 * sr] = 0
    return audio + (1e-4 * rng.standard_normal(len(audio))).astype(np.float32)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def bench_clip(codec, name: str, audio: np.ndarray, args) -> dict:
    seconds = len(audio) / codec.sample_rate
    codes, t_enc = timed(codec_lib.encode, codec, audio, args.bandwidth, args.chunk_seconds, 1.0, args.batch_size)
    recon, t_dec = timed(codec_lib.decode, codec, codes, None, args.chunk_seconds, 1.0, args.batch_size)
    scores, t_score = timed(score_audio, audio, codes.shape[1], codec.hop)
    return {
        "clip": name,
        "audio_seconds": round(seconds, 2),
        "codes_shape": list(codes.shape),
        "distinct_codes_codebook0": int(len(np.unique(codes[0]))),
        "encode_seconds": round(t_enc, 3),
        "encode_rtf": round(t_enc / seconds, 4),
        "encode_x_realtime": round(seconds / t_enc, 1),
        "decode_seconds": round(t_dec, 3),
        "decode_rtf": round(t_dec / seconds, 4),
        "decode_x_realtime": round(seconds / t_dec, 1),
        "score_seconds": round(t_score, 4),
        "score_chunks": len(scores["chunk"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="audio files (default: a synthetic 60 s clip)")
    parser.add_argument("--codec", default="", help="a local EnCodec folder (default: full size, random weights)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the synthetic clip")
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--chunk-seconds", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.codec:
        codec = codec_lib.load_codec(args.codec, args.device)
    else:
        from transformers import EncodecConfig, EncodecModel

        torch.manual_seed(0)
        codec = codec_lib.from_model(EncodecModel(EncodecConfig()), "random-encodec_24khz", args.device)
    sr = codec.sample_rate
    clips = [(f.name, read_audio(f, sr)) for f in args.files] or [
        (f"synthetic {args.seconds:g} s", synthetic_music(args.seconds, sr))]
    if not args.codec:
        codec_lib.seed_codebooks(codec, clips[0][1][: 30 * sr], args.bandwidth)
    codec_lib.encode(codec, clips[0][1][: 2 * sr], args.bandwidth)  # warm-up: first calls set up kernels

    results = [bench_clip(codec, name, audio, args) for name, audio in clips]
    print(json.dumps({
        "codec": codec.name,
        "parameters": sum(p.numel() for p in codec.model.parameters()),
        "device": str(codec.device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "bandwidth_kbps": args.bandwidth,
        "chunk_seconds": args.chunk_seconds,
        "batch_size": args.batch_size,
        "clips": results,
    }, indent=2))


if __name__ == "__main__":
    main()
