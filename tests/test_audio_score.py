"""Per-chunk features on synthetic signals whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from audio_helpers import SR, noise, silence, tone

from toolkit.audio.score import ScoreConfig, _cosine, chunk_spectra, ema, score_audio
from toolkit.errors import UserError

HOP = 320
CHUNK = 54 * HOP  # samples per chunk at the default 54 frames


def frames(audio):
    return int(np.ceil(len(audio) / HOP))


def test_ema_matches_the_recursion():
    x = np.random.default_rng(0).standard_normal((300, 3))
    for span in (1, 5, 125):
        a = 2 / (span + 1)
        ref = np.empty_like(x)
        ref[0] = x[0]
        for t in range(1, len(x)):
            ref[t] = a * x[t] + (1 - a) * ref[t - 1]
        np.testing.assert_allclose(ema(x, span), ref, atol=1e-10)


def test_chunk_spectra_match_a_per_chunk_fft():
    audio = np.random.default_rng(1).standard_normal(3 * CHUNK + 1000).astype(np.float32)
    spec = chunk_spectra(audio, 4, CHUNK, 160, 256, block_chunks=3)
    window = np.hanning(258)[1:-1]
    padded = np.concatenate([np.zeros(48), audio, np.zeros(4 * CHUNK - len(audio) + 256)])
    for c in (0, 2, 3):  # windows centred at 160 * (w + 1/2) inside the chunk
        starts = c * CHUNK + np.arange(CHUNK // 160) * 160
        ref = np.mean([np.abs(np.fft.rfft(padded[s : s + 256] * window)) for s in starts], axis=0)
        np.testing.assert_allclose(spec[c], ref, rtol=1e-4, atol=1e-4)


def test_silence_to_loud_transition_has_the_top_novelty():
    audio = np.concatenate([silence(20 * CHUNK / SR), noise(20 * CHUNK / SR, 0.3, seed=3)])
    s = score_audio(audio, frames(audio), HOP)
    assert len(s["chunk"]) == 40
    assert 20 <= int(np.argmax(s["novelty"])) <= 21 and s["novelty"].max() == pytest.approx(1.0)
    assert s["silent"][:20].all() and not s["silent"][20:].any()
    assert s["shape_flux"][20] > 5 * s["shape_flux"][21:].max()  # (chunk 19's last window reaches into the noise)
    assert s["magnitude_flux"][20] > 10 * s["magnitude_flux"][21:].max()
    assert (s["priority_score"][:20] == 0).all() and (s["priority_score"][20:] > 0).all()
    assert int(np.argmax(s["priority_score"])) in (20, 21)


def test_a_steady_tone_is_stable_and_unremarkable():
    audio = tone(30 * CHUNK / SR, 440.0, 0.3)
    s = score_audio(audio, frames(audio), HOP)
    assert s["stability"].min() > 0.999
    assert s["shape_flux"][1:].max() < 1e-3
    np.testing.assert_allclose(s["rms_energy"], 0.3 / np.sqrt(2), rtol=1e-3)
    assert not s["silent"].any()
    # a change of pitch in the middle: less stable there, and more novel than anywhere else
    changed = np.concatenate([tone(15 * CHUNK / SR, 440.0), tone(15 * CHUNK / SR, 1250.0)])
    c = score_audio(changed, frames(changed), HOP)
    assert c["stability"][14] < 0.7 and c["stability"][:10].min() > 0.999 and c["shape_flux"][15] > 0.5
    assert 15 <= int(np.argmax(c["novelty"])) <= 16


def test_chunk_offsets_weights_and_partial_last_chunk():
    audio = np.concatenate([tone(2.0, 300.0), noise(1.3, 0.2, seed=5)])
    n = frames(audio)
    s = score_audio(audio, n, HOP, ScoreConfig(chunk_frames=40))
    assert list(s["frame_start"]) == list(range(0, n, 40)) and s["frame_end"][-1] == n
    np.testing.assert_allclose(s["rms_energy"][-1], np.sqrt(np.mean(audio[(len(s["chunk"]) - 1) * 40 * HOP :] ** 2)))
    only_novelty = score_audio(audio, n, HOP, ScoreConfig(chunk_frames=40, novelty_weight=1.0, stability_weight=0.0))
    np.testing.assert_allclose(only_novelty["priority_score"], only_novelty["novelty"])
    both = score_audio(audio, n, HOP, ScoreConfig(chunk_frames=40))
    np.testing.assert_allclose(both["priority_score"], 0.7 * both["novelty"] + 0.3 * (1 - both["stability"]) ** 2)
    quiet = score_audio(silence(2.0), frames(silence(2.0)), HOP)
    assert quiet["silent"].all() and (quiet["priority_score"] == 1.0).all()  # all silent: uniform
    with pytest.raises(UserError, match="--chunk-frames 0"):
        ScoreConfig(chunk_frames=0)


def test_cosine_handles_silent_rows():
    a = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [2.0, 2.0]])
    np.testing.assert_allclose(_cosine(a, b), [1.0, 0.0, 0.0, 1.0])
