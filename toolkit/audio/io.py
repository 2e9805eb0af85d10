"""Audio files in and out: soundfile reads (mono downmix), soxr resamples, soundfile writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from toolkit.audio import AUDIO_SUFFIXES
from toolkit.errors import UserError
from toolkit.fsio import atomic_write

BLOCK_FRAMES = 1 << 20  # frames read per block: the file is never held at its own rate and channel count


def audio_info(path: Path):
    import soundfile as sf

    try:
        return sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the problem
        raise UserError(f"cannot read audio {path}: {e}") from None


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """The whole file as mono float32 at `sample_rate`, read block by block (downmix, then resample)."""
    import soundfile as sf
    import soxr

    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio file not found: {path}")
    parts = []
    try:
        with sf.SoundFile(str(path)) as f:
            resampler = None if f.samplerate == sample_rate else soxr.ResampleStream(
                f.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
            while True:
                block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                last = len(block) < BLOCK_FRAMES
                mono = block.mean(axis=1, dtype=np.float32)
                parts.append(mono if resampler is None else resampler.resample_chunk(mono, last=last))
                if last:
                    break
    except UserError:
        raise
    except Exception as e:
        # libsndfile says "File does not exist" of a file it cannot decode: the file is there
        reason = "not an audio file it can decode" if "does not exist" in str(e) else str(e)
        raise UserError(f"cannot read audio {path}: {reason}") from None
    check_wav_length(path)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if len(audio) == 0:
        raise UserError(f"{path}: the file holds no audio")
    return np.ascontiguousarray(audio, dtype=np.float32)


def check_wav_length(path: Path) -> None:
    """A WAV file cut short (a copy or download that stopped) still decodes, as fewer frames than its header
    declares: refuse it rather than encode a fraction of the audio silently."""
    if path.suffix.lower() != ".wav":
        return
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size = path.stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            name, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if name == b"data":
                available = size - f.tell()
                if length not in (0, 0xFFFFFFFF) and available < length:  # 0 / -1: streamed, length unknown
                    raise UserError(f"{path}: truncated: its header declares {length:,} bytes of audio, the file "
                                    f"holds {available:,} ({100 * available / length:.1f} %)")
                return
            f.seek(length + (length & 1), 1)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Mono float audio to .wav / .flac (16-bit PCM) or any other format soundfile knows by the suffix."""
    import soundfile as sf

    path = Path(path)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3", ".aiff": "AIFF", ".aif": "AIFF"}.get(
        path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown audio format {path.suffix!r}; use .wav or .flac")
    subtype = "PCM_16" if fmt in ("WAV", "FLAC", "AIFF") else None
    atomic_write(path, lambda tmp: sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sample_rate, format=fmt,
                                            subtype=subtype))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_audio(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(file, name relative to its input) for every audio file among `inputs` (files, or folders searched deeply)."""
    found = []
    for inp in inputs:
        inp = Path(inp)
        if inp.is_file():
            found.append((inp, Path(inp.name)))
        elif inp.is_dir():
            files = sorted(p for p in inp.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise UserError(f"{inp}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
            found.extend((p, p.relative_to(inp)) for p in files)
        else:
            raise UserError(f"not found: {inp}")
    return found
