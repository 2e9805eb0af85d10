"""Audio I/O, the EnCodec wrapper (tiny random codec, no network), code files and the `lmkit audio` commands."""

from __future__ import annotations

import hashlib
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_helpers import SR, music, noise, silence, tiny_codec, tone
from conftest import lmkit

from toolkit.audio import codec as codec_lib
from toolkit.audio.codes import CodeFile, load_codes, save_codes
from toolkit.audio.io import read_audio
from toolkit.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    return tiny_codec()


@pytest.fixture(scope="module")
def codec_dir(codec, tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "tiny"
    codec.model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def song_files(tmp_path_factory):
    """The same 6 s of test music at 44.1 kHz stereo as wav, flac, ogg and mp3."""
    folder = tmp_path_factory.mktemp("songs") / "songs"
    folder.mkdir()
    mono = music(6.0, seed=3, sr=44_100)
    stereo = np.stack([mono, mono], axis=1)
    for ext in ("wav", "flac", "ogg", "mp3"):
        sf.write(folder / f"song_{ext}.{ext}", stereo, 44_100)
    return folder


def test_read_audio_every_format_downmixes_and_resamples(tmp_path, song_files):
    reference = read_audio(song_files / "song_wav.wav", SR)
    assert reference.dtype == np.float32 and abs(len(reference) - 6 * SR) <= 2
    sf.write(tmp_path / "tone.wav", tone(2.0, 440, sr=44_100), 44_100, subtype="FLOAT")
    resampled = read_audio(tmp_path / "tone.wav", SR)
    assert len(resampled) == 2 * SR
    np.testing.assert_allclose(resampled[100:-100], tone(2.0, 440)[100:-100], atol=2e-3)  # soxr vs synthesis
    for ext in ("flac", "ogg", "mp3"):
        audio = read_audio(song_files / f"song_{ext}.{ext}", SR)
        assert abs(len(audio) - len(reference)) <= 2, ext
        n = min(len(audio), len(reference))
        assert np.corrcoef(audio[:n], reference[:n])[0, 1] > (0.9999 if ext == "flac" else 0.95), ext
    # mono downmix: left = tone, right = silence -> half the tone
    sf.write(tmp_path / "lr.wav", np.stack([tone(1.0, 440, 0.5), silence(1.0)], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(read_audio(tmp_path / "lr.wav", SR), tone(1.0, 440, 0.25), atol=1e-6)
    (tmp_path / "bad.mp3").write_bytes(b"not audio at all")
    with pytest.raises(UserError, match="cannot read audio .*bad.mp3"):
        read_audio(tmp_path / "bad.mp3", SR)


def test_codes_vary_and_have_the_expected_shape(codec):
    audio = music(4.0, seed=5)
    codes = codec_lib.encode(codec, audio, 6.0)
    assert codes.dtype == np.int16 and codes.shape == (8, math.ceil(len(audio) / 320))
    assert len(np.unique(codes[0])) > 50 and all(len(np.unique(row)) > 5 for row in codes)
    assert codes.min() >= 0 and codes.max() < 1024
    assert codec_lib.encode(codec, audio, 3.0).shape[0] == 4
    np.testing.assert_array_equal(codec_lib.encode(codec, audio, 3.0), codes[:4])  # residual VQ: a prefix
    # the reference: transformers' own single-pass encode
    with torch.inference_mode():
        ref = codec.model.encode(torch.from_numpy(audio)[None, None], bandwidth=6.0).audio_codes[0, 0].numpy()
    np.testing.assert_array_equal(codes, ref)
    with pytest.raises(UserError, match="bandwidth 5: this codec supports 1.5, 3, 6 kbps"):
        codec_lib.encode(codec, audio, 5.0)


def test_chunked_encoding_matches_one_pass_away_from_cuts(codec):
    audio = np.concatenate([music(9.0, seed=11), music(9.0, seed=12)])
    whole = codec_lib.encode(codec, audio, 6.0, chunk_seconds=100)
    cuts = codec_lib.plan_chunks(len(audio), 3 * SR, codec_lib.silence_cuts(audio, SR), 320)
    assert len(cuts) >= 6
    after_cut = np.zeros(whole.shape[1], dtype=bool)
    for start, _ in cuts[1:]:
        after_cut[start // 320 : start // 320 + 20] = True
    # The encoder is causal: with a second of left context a chunk's encoder output matches one pass to rounding.
    x = torch.from_numpy(audio)[None, None]
    s, e = cuts[2]
    with torch.inference_mode():
        one_pass = codec.model.encoder(x)[0, :, s // 320 : e // 320]
        chunk = codec.model.encoder(x[..., s - SR : e])[0, :, 75:]
    assert (one_pass - chunk).abs().max() < 1e-5
    # Codes: a random codec's deeper codebooks sit on near-ties that 1e-8 of rounding flips, so a few codes differ
    # anywhere; at the cuts without context most differ, with context hardly any.
    with_context = codec_lib.encode(codec, audio, 6.0, chunk_seconds=3, context_seconds=1.0, batch_size=3)
    no_context = codec_lib.encode(codec, audio, 6.0, chunk_seconds=3, context_seconds=0.0, batch_size=3)
    assert with_context.shape == no_context.shape == whole.shape
    assert (with_context[0] == whole[0]).mean() > 0.99 and (with_context == whole).mean() > 0.98
    assert (no_context[0, ~after_cut] == whole[0, ~after_cut]).mean() > 0.99
    assert (no_context[:, ~after_cut] == whole[:, ~after_cut]).mean() > 0.96
    assert (no_context[:, after_cut] != whole[:, after_cut]).mean() > 0.3


def test_chunks_are_cut_in_silences_on_frame_boundaries():
    # music(5.0) has its own 1.5 s gap at 2.0-3.5 s; then silences at 5.0-7.0 s and 10.0-11.2 s
    audio = np.concatenate([music(5.0, seed=1), silence(2.0), noise(3.0, seed=2), silence(1.2), noise(2.5, seed=4)])
    cuts = codec_lib.silence_cuts(audio, SR)
    assert len(cuts) == 3, cuts / SR
    np.testing.assert_allclose(cuts / SR, [2.75, 6.0, 10.6], atol=0.05)
    chunks = codec_lib.plan_chunks(len(audio), 7 * SR, cuts, 320)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(s % 320 == 0 and 0 < e - s <= 7 * SR for s, e in chunks)
    # 13.7 s: first cut in the silence nearest the middle (6.0 s), then 6.0-13.7 s at 10.6 s
    assert [s for s, _ in chunks[1:]] == [int(cuts[1]) // 320 * 320, int(cuts[2]) // 320 * 320]
    no_silence = codec_lib.plan_chunks(10 * SR + 17, 3 * SR, np.zeros(0), 320)
    assert len(no_silence) == 4 and max(e - s for s, e in no_silence) <= 3 * SR


def test_decode_length_and_chunked_decode(codec):
    audio = music(7.0, seed=8)
    codes = codec_lib.encode(codec, audio, 6.0)
    one = codec_lib.decode(codec, codes, chunk_seconds=100)
    assert one.shape == (codes.shape[1] * 320,) and one.dtype == np.float32
    with torch.inference_mode():
        ref = codec.model.decode(torch.from_numpy(codes.astype(np.int64))[None, None], [None])[0][0, 0].numpy()
    np.testing.assert_allclose(one, ref, atol=1e-5)
    chunked = codec_lib.decode(codec, codes, chunk_seconds=2, context_seconds=1.0, batch_size=2)
    np.testing.assert_allclose(chunked, one, atol=1e-3 * np.abs(one).max())
    coarse = codec_lib.decode(codec, codes, n_codebooks=1)
    with torch.inference_mode():
        ref1 = codec.model.decoder(codec.model.quantizer.decode(torch.from_numpy(codes[:1].astype(np.int64))[:, None]))
    np.testing.assert_allclose(coarse, ref1[0, 0].numpy(), atol=1e-5)
    with pytest.raises(UserError, match="--codebooks 9: the code file has 8 codebooks"):
        codec_lib.decode(codec, codes, n_codebooks=9)


def test_offline_and_missing_codec_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match=r"cannot load EnCodec 'facebook/encodec_24khz'.*pass --codec PATH"):
        codec_lib.load_codec("facebook/encodec_24khz", "cpu")  # HF_HUB_OFFLINE=1 in conftest: fails at once
    with pytest.raises(UserError, match="--codec ./nowhere: no such folder"):
        codec_lib.load_codec("./nowhere", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an EnCodec model folder"):
        codec_lib.load_codec(str(tmp_path / "empty"), "cpu")


def _code_file(codes, **kw) -> CodeFile:
    fields = dict(codes=codes, sample_rate=SR, frame_rate=75.0, bandwidth=6.0, num_samples=codes.shape[1] * 320,
                  codec="facebook/encodec_24khz", source="a.wav", sha256="0" * 64)
    fields.update(kw)
    return CodeFile(**fields)


def test_code_file_round_trip_and_validation(tmp_path):
    codes = np.random.default_rng(0).integers(0, 1024, (8, 100)).astype(np.int16)
    save_codes(tmp_path / "ok.npz", _code_file(codes, num_samples=100 * 320 - 100))
    cf = load_codes(tmp_path / "ok.npz")
    np.testing.assert_array_equal(cf.codes, codes)
    assert (cf.sample_rate, cf.frame_rate, cf.bandwidth, cf.codec, cf.source) == (
        SR, 75.0, 6.0, "facebook/encodec_24khz", "a.wav")
    assert cf.duration == pytest.approx((100 * 320 - 100) / SR)
    with np.load(tmp_path / "ok.npz", allow_pickle=False) as raw:
        good = {k: raw[k] for k in raw.files}
    assert float(good["duration"]) == pytest.approx(cf.duration)

    def write(name, **changes):
        arrays = {**good, **changes}
        np.savez(tmp_path / name, **{k: v for k, v in arrays.items() if v is not None})
        return tmp_path / name

    with pytest.raises(UserError, match=r"missing key\(s\) sha256, bandwidth|missing key\(s\) bandwidth, sha256"):
        load_codes(write("m.npz", sha256=None, bandwidth=None))
    with pytest.raises(UserError, match=r"'codes' should have shape \(n_codebooks, frames\), got \(800,\)"):
        load_codes(write("flat.npz", codes=codes.reshape(-1)))
    with pytest.raises(UserError, match="'codes' should hold integers"):
        load_codes(write("float.npz", codes=codes.astype(np.float32)))
    with pytest.raises(UserError, match="'codes' has 90 frames but 31900 samples at 75 Hz make 100"):
        load_codes(write("short.npz", codes=codes[:, :90]))
    with pytest.raises(UserError, match="holds pickled objects"):
        load_codes(write("obj.npz", codec=np.array([{"a": 1}], dtype=object)))
    (tmp_path / "junk.npz").write_bytes(b"PK junk")
    with pytest.raises(UserError, match="junk.npz: not a code file"):
        load_codes(tmp_path / "junk.npz")
    with pytest.raises(UserError, match="code file not found"):
        load_codes(tmp_path / "none.npz")
    # the seed's files: tokens + rates only
    np.savez_compressed(tmp_path / "seed.npz", tokens=codes.astype(np.int64), sample_rate=np.array(SR),
                        frame_rate=np.array(75), target_bandwidth=np.array(6.0))
    seed = load_codes(tmp_path / "seed.npz")
    np.testing.assert_array_equal(seed.codes, codes)
    assert seed.bandwidth == 6.0 and seed.num_samples == 100 * 320


def test_cli_encode_info_decode_score(capsys, tmp_path, codec_dir, song_files):
    out = tmp_path / "codes"
    code, _, err = lmkit(capsys, "-q", "audio", "encode", str(song_files), "-o", str(out), "--codec", str(codec_dir),
                         "--device", "cpu")
    assert code == 0, err
    files = sorted(p.name for p in out.glob("*.npz"))
    assert files == ["song_flac.npz", "song_mp3.npz", "song_ogg.npz", "song_wav.npz"]
    wav = load_codes(out / "song_wav.npz")
    assert wav.codes.shape == (8, math.ceil(wav.num_samples / 320)) and abs(wav.duration - 6.0) < 1e-3
    assert len(np.unique(wav.codes[0])) > 50
    for other, at_least in (("flac", 0.98), ("ogg", 0.6), ("mp3", 0.6)):  # the same music: much the same codes
        codes = load_codes(out / f"song_{other}.npz").codes
        n = min(codes.shape[1], wav.frames)
        assert (codes[0, :n] == wav.codes[0, :n]).mean() > at_least, other
    assert wav.source == "song_wav.wav" and wav.codec == str(codec_dir.resolve())
    assert wav.sha256 == hashlib.sha256((song_files / "song_wav.wav").read_bytes()).hexdigest()

    code, _, err = lmkit(capsys, "audio", "encode", str(song_files), "-o", str(out), "--codec", str(codec_dir))
    assert code == 1 and "already exists (4 of 4 code files do); pass --force" in err

    code, stdout, _ = lmkit(capsys, "audio", "info", str(out / "song_wav.npz"))
    assert code == 0 and "8 codebooks x 450 frames" in stdout and "song_wav.wav" in stdout and "6 kbps" in stdout

    code, _, err = lmkit(capsys, "-q", "audio", "decode", str(out / "song_wav.npz"), "-o", str(tmp_path / "r.wav"),
                         "--codebooks", "2")
    assert code == 0, err
    info = sf.info(tmp_path / "r.wav")
    assert (info.samplerate, info.frames, info.channels) == (SR, wav.num_samples, 1)
    code, _, err = lmkit(capsys, "audio", "decode", str(out / "song_wav.npz"), "-o", str(tmp_path / "r.wav"))
    assert code == 1 and "already exists; pass --force" in err

    scores = tmp_path / "scores.parquet"
    moved = tmp_path / "moved"
    shutil.copytree(song_files, moved)
    shutil.rmtree(song_files)  # the sources are gone from where they were encoded
    code, _, err = lmkit(capsys, "audio", "score", str(out), "-o", str(scores))
    assert code == 1 and "source audio 'song_flac.flac' not found" in err and "--audio-dir" in err
    code, _, err = lmkit(capsys, "-q", "audio", "score", str(out), "-o", str(scores), "--audio-dir", str(moved),
                         "--chunk-frames", "40")
    assert code == 0, err
    import pyarrow.parquet as pq

    table = pq.read_table(scores).to_pydict()
    rows = [i for i, f in enumerate(table["file"]) if f == "codes/song_wav.npz"]
    assert len(rows) == math.ceil(450 / 40) and len(table["file"]) == 4 * len(rows)
    assert [table["frame_start"][i] for i in rows] == list(range(0, 450, 40))
    assert table["frame_end"][rows[-1]] == 450 and set(table["chunk_frames"]) == {40}
    assert table["start_seconds"][rows[1]] == pytest.approx(40 / 75)
    code, _, err = lmkit(capsys, "-q", "audio", "score", str(out / "song_wav.npz"), "-o", str(tmp_path / "d.parquet"),
                         "--decode")  # no audio: score the decoded codes (codec named in the code file)
    assert code == 0, err
    decoded = pq.read_table(tmp_path / "d.parquet").to_pydict()
    assert decoded["frame_start"] == list(range(0, 450, 54)) and set(decoded["file"]) == {"codes/song_wav.npz"}
    shutil.copytree(moved, song_files)  # put the module fixture back
