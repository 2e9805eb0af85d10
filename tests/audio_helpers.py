"""Test-made audio and a tiny EnCodec with random weights (codebooks seeded from audio so codes vary)."""

from __future__ import annotations

import numpy as np

SR = 24_000


def tone(seconds: float, freq: float, amp: float = 0.3, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, amp: float = 0.3, seed: int = 0, sr: int = SR) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


def silence(seconds: float, sr: int = SR) -> np.ndarray:
    return np.zeros(int(seconds * sr), dtype=np.float32)


def music(seconds: float = 8.0, seed: int = 0, sr: int = SR) -> np.ndarray:
    """Tones, chords and noise bursts with a 1.5 s silence at 40 % of the length."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0.0
    while total < seconds:
        kind = rng.integers(3)
        dur = float(rng.uniform(0.3, 1.2))
        if kind == 0:
            part = tone(dur, float(rng.uniform(110, 880)), sr=sr)
        elif kind == 1:
            part = sum(tone(dur, f, 0.15, sr) for f in rng.uniform(150, 600, 3))
        else:
            part = noise(dur, 0.2, int(rng.integers(1 << 30)), sr) * np.linspace(1, 0, int(dur * sr), dtype=np.float32)
        parts.append(part.astype(np.float32))
        total += dur
    audio = np.concatenate(parts)[: int(seconds * sr)]
    gap = int(0.4 * len(audio))
    audio[gap : gap + int(1.5 * sr)] = 0.0
    # a -80 dBFS noise floor, as recordings have: digital zeros leave a random codec's deep residuals at 1e-8,
    # where rounding alone picks the code
    return audio + noise(len(audio) / sr, 1e-4, seed + 1, sr)[: len(audio)]


def tiny_codec(seed: int = 0):
    """A 24 kHz EnCodec layout (hop 320, 75 Hz, 8 codebooks of 1024 at 6 kbps) a thousand times smaller."""
    import torch
    from transformers import EncodecConfig, EncodecModel

    from toolkit.audio.codec import from_model, seed_codebooks

    torch.manual_seed(seed)
    cfg = EncodecConfig(num_filters=4, hidden_size=16, num_lstm_layers=1, target_bandwidths=[1.5, 3.0, 6.0])
    codec = from_model(EncodecModel(cfg), "tiny-encodec", "cpu")
    seed_codebooks(codec, np.concatenate([music(13.0, seed=100), noise(1.0, 0.05, 7)]), 6.0, seed=seed)
    return codec
