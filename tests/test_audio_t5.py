"""Audio for T5: per-file meta in audio shards, priority sampling, the codes source in `prepare`, and the rollout."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import tomllib
from audio_helpers import SR, music, tiny_codec
from conftest import TINY_RECIPE, lmkit

from toolkit import tokenizers
from toolkit.audio.codes import CodeFile, load_codes, save_codes
from toolkit.errors import UserError
from toolkit.recipe import DataConfig, TokenizerConfig, build_table
from toolkit.shards.audio import pretokenize_codes, split_files
from toolkit.shards.format import ShardSet, open_shard
from toolkit.shards.sampler import BatchSampler, PrioritySampler, make_sampler
from toolkit.tokenizers.audio import AudioTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_codes(folder, n_files, frames=300, seed=0):
    folder.mkdir(parents=True)
    for i in range(n_files):
        codes = np.random.default_rng(seed + i).integers(0, 1024, (8, frames + 17 * i)).astype(np.int16)
        save_codes(folder / f"song{i}.npz", CodeFile(codes=codes, sample_rate=SR, frame_rate=75.0, bandwidth=6.0,
                                                      num_samples=codes.shape[1] * 320, codec="c", source=f"{i}.wav",
                                                      sha256=f"{i:064d}"))
    return folder


def write_scores(path, rows):
    """rows: (file relative to the parquet's folder, frame_start, frame_end, priority)."""
    files, starts, ends, prio = zip(*rows)
    pq.write_table(pa.table({"file": list(files), "frame_start": np.array(starts, dtype=np.int64),
                             "frame_end": np.array(ends, dtype=np.int64), "priority_score": np.array(prio, float)}),
                   path)


def chunk_rows(codes_dir, rel_prefix="", chunk=20, priority=None):
    rows = []
    for p in sorted(codes_dir.glob("*.npz")):
        frames = load_codes(p).frames
        for c, s in enumerate(range(0, frames, chunk)):
            rows.append((rel_prefix + p.name, s, min(s + chunk, frames), 1.0 if priority is None else priority(p, c)))
    return rows


def stream_of(shards_dir, meta, split):
    return np.concatenate([open_shard(shards_dir / n) for n in meta["shards"][split]]).astype(np.int64)


# --- pretokenize: where each file lies --------------------------------------------------------------------


@pytest.mark.parametrize("layout,k", [("codebook0", 1), ("flatten", 2), ("delay", 3)])
def test_pretokenize_records_file_ranges(tmp_path, layout, k):
    codes_dir = write_codes(tmp_path / "codes", 5, frames=120)
    (codes_dir / "sub").mkdir()
    (codes_dir / "song1.npz").rename(codes_dir / "sub" / "song1.npz")  # relative paths keep subfolders
    tok = AudioTokenizer(layout, k)
    tok.save(tmp_path / "tok")
    meta = pretokenize_codes(codes_dir, tmp_path / "tok", tmp_path / "shards", shard_tokens=1024,
                             append_eos=True).meta
    audio = meta["audio"]
    assert audio["tokens_per_frame"] == k and audio["codes_dir"] == str(codes_dir.resolve())
    splits = split_files(sorted(codes_dir.rglob("*.npz")), 0.1)
    for split in ("train", "val"):
        stream = stream_of(tmp_path / "shards", meta, split)
        entries = audio["files"][split]
        assert [e["file"] for e in entries] == [p.relative_to(codes_dir).as_posix() for p in splits[split]]
        assert "sub/song1.npz" in [e["file"] for e in audio["files"]["train"] + audio["files"]["val"]]
        assert entries[0]["start"] == 0 and sum(e["tokens"] for e in entries) == len(stream)
        for e in entries:
            cf = load_codes(codes_dir / e["file"])
            assert e["frames"] == cf.frames and e["frame_offset"] == 0
            piece = stream[e["start"] : e["start"] + e["tokens"]]
            assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
            np.testing.assert_array_equal(piece[1:-1], tok.encode_codes(cf.codes))
            steps = cf.frames + (k - 1 if layout == "delay" else 0)
            assert e["tokens"] == 2 + steps * k
            # frame j begins at start + 1 + j * tokens_per_frame: codebook 0 of frame j is there
            j = np.arange(0, cf.frames, 7)
            np.testing.assert_array_equal(stream[e["start"] + 1 + j * k], cf.codes[0, j])


def test_pretokenize_one_file_records_both_parts(tmp_path):
    write_codes(tmp_path / "one", 1, frames=200)
    AudioTokenizer("flatten", 2).save(tmp_path / "tok")
    meta = pretokenize_codes(tmp_path / "one", tmp_path / "tok", tmp_path / "shards", shard_tokens=1024).meta
    files = meta["audio"]["files"]
    assert files["train"] == [{"file": "song0.npz", "start": 0, "tokens": 1 + 180 * 2, "frames": 180,
                               "frame_offset": 0}]
    assert files["val"] == [{"file": "song0.npz", "start": 0, "tokens": 1 + 20 * 2, "frames": 20,
                             "frame_offset": 180}]


# --- priority sampling ------------------------------------------------------------------------------------


@pytest.fixture
def audio_shards(tmp_path):
    """6 files of 300-385 frames, flatten K=2 (2 tokens per frame), shards of 1024 tokens (files cross them)."""
    codes_dir = write_codes(tmp_path / "codes", 6)
    AudioTokenizer("flatten", 2).save(tmp_path / "tok")
    pretokenize_codes(codes_dir, tmp_path / "tok", tmp_path / "shards", shard_tokens=1024, append_eos=True)
    return codes_dir, ShardSet(tmp_path / "shards")


def test_priority_windows_are_centred_aligned_and_inside_their_file(audio_shards):
    codes_dir, shards = audio_shards
    write_scores(codes_dir / "scores.parquet", chunk_rows(codes_dir))
    seq_len, k = 64, 2
    sampler = PrioritySampler(shards, "train", seq_len, 8, 0, codes_dir / "scores.parquet")
    meta = shards.meta["audio"]
    train = meta["files"]["train"]
    assert len(sampler.weights) == sum(math.ceil(e["frames"] / 20) for e in train)  # val files' chunks ignored
    sizes = [len(a) for a in shards.splits["train"]]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    stream = np.concatenate(shards.splits["train"]).astype(np.int64)
    i = 0
    centred = 0
    for e in train:  # the chunk table follows the parquet's row order: files sorted, chunks in order
        code0, end = e["start"] + 1, e["start"] + e["tokens"]
        for s in range(0, e["frames"], 20):
            middle = (s + min(s + 20, e["frames"])) // 2
            centre = code0 + middle * k
            shard, off = sampler.chunk_shard[i], sampler.chunk_offset[i]
            start = bounds[shard] + off
            assert off >= 0 and off + seq_len + 1 <= sizes[shard]  # inside one shard
            home = np.searchsorted(bounds, centre, side="right") - 1
            assert shard == home or sizes[home] < seq_len + 1  # the centre's shard, unless it is too short
            lo, hi = max(code0, bounds[shard]), min(end, bounds[shard + 1])
            if hi - lo >= seq_len + 1 + k:  # room for an aligned window: inside the file, on a frame boundary
                assert (start - code0) % k == 0 and lo <= start and start + seq_len + 1 <= hi
                if lo <= centre - 32 and centre + 33 <= hi:  # not at an edge: centred exactly
                    assert start == centre - 32 and stream[start] < 1024  # codebook 0 opens the window
                    centred += 1
            i += 1
    assert i == len(sampler.weights) and centred > 20
    which, offsets = sampler.draw()
    x, y = sampler.read(which, offsets)
    assert x.shape == y.shape == (8, seq_len) and x.dtype == y.dtype == np.int64
    for r in range(8):
        start = bounds[which[r]] + offsets[r]
        np.testing.assert_array_equal(x[r], stream[start : start + seq_len])
        np.testing.assert_array_equal(y[r], stream[start + 1 : start + seq_len + 1])


def test_priority_frequencies_state_and_resume(audio_shards):
    codes_dir, shards = audio_shards
    train = shards.meta["audio"]["files"]["train"]
    hot = train[1]["file"]
    write_scores(codes_dir / "scores.parquet", chunk_rows(codes_dir, priority=lambda p, c: float(p.name == hot and
                                                                                                c == 5)))
    one = PrioritySampler(shards, "train", 32, 16, 1, codes_dir / "scores.parquet")
    which, offsets = one.draw()
    assert len(set(zip(which.tolist(), offsets.tolist()))) == 1  # all the priority: always that chunk
    code0 = train[1]["start"] + 1
    bounds = np.concatenate([[0], np.cumsum([len(a) for a in shards.splits["train"]])])
    start, centre = bounds[which[0]] + offsets[0], code0 + (5 * 20 + 10) * 2
    assert start <= centre < start + 33 and (start - code0) % 2 == 0

    # 3 : 1 between two chunks (parquet elsewhere, file paths relative to it)
    elsewhere = codes_dir.parent / "scores"
    elsewhere.mkdir()
    rows = [("../codes/" + train[0]["file"], 0, 20, 3.0), ("../codes/" + train[2]["file"], 40, 60, 1.0),
            ("../codes/" + train[3]["file"], 0, 20, 0.0)]
    write_scores(elsewhere / "s.parquet", rows)
    two = PrioritySampler(shards, "train", 32, 4000, 2, elsewhere / "s.parquet")
    which, offsets = two.draw()
    first = (which == two.chunk_shard[0]) & (offsets == two.chunk_offset[0])
    assert abs(first.mean() - 0.75) < 0.03

    write_scores(codes_dir / "scores.parquet", chunk_rows(codes_dir, priority=lambda p, c: 1.0 + c % 3))
    a = PrioritySampler(shards, "train", 32, 4, 7, codes_dir / "scores.parquet")
    a.next_batch()
    saved = a.state()
    after = [a.next_batch() for _ in range(3)]
    b = PrioritySampler(shards, "train", 32, 4, 99, codes_dir / "scores.parquet")
    b.set_state(json.loads(json.dumps(saved)))  # as a checkpoint stores it
    for (xa, ya), (xb, yb) in zip(after, [b.next_batch() for _ in range(3)]):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_priority_sampler_files_without_rows_and_errors(audio_shards, tmp_path, capsys):
    from toolkit import console

    codes_dir, shards = audio_shards
    train = shards.meta["audio"]["files"]["train"]
    write_scores(codes_dir / "scores.parquet", [(train[0]["file"], 0, 20, 1.0)])
    console.set_quiet(False)
    capsys.readouterr()
    sampler = PrioritySampler(shards, "train", 32, 4, 0, codes_dir / "scores.parquet")
    assert len(sampler.weights) == 1
    assert f"{len(train) - 1} of {len(train)} train file(s) have no chunks" in capsys.readouterr().err
    other = write_codes(tmp_path / "other", 2, seed=50)
    write_scores(other / "scores.parquet", chunk_rows(other))
    with pytest.raises(UserError, match=f"no chunk in {other}/scores.parquet belongs to a train file of {codes_dir}"):
        PrioritySampler(shards, "train", 32, 4, 0, other / "scores.parquet")
    with pytest.raises(UserError, match="scores not found"):
        PrioritySampler(shards, "train", 32, 4, 0, tmp_path / "none.parquet")

    def recipe(**data):
        return types.SimpleNamespace(data=types.SimpleNamespace(**{"sampling": "priority", "scores": "",
                                                                   "source": str(codes_dir), **data}))

    assert isinstance(make_sampler(recipe(sampling="uniform"), shards, "train", 32, 4, 0), BatchSampler)
    assert isinstance(make_sampler(recipe(), shards, "train", 32, 4, 0), PrioritySampler)  # scores in codes_dir
    text = tmp_path / "text_shards"
    text.mkdir()
    meta = {k: v for k, v in shards.meta.items() if k != "audio"}
    for name in meta["shards"]["train"] + meta["shards"]["val"]:
        (text / name).write_bytes((shards.folder / name).read_bytes())
    (text / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="sampling = \"priority\" needs shards made from audio code files"):
        make_sampler(recipe(), ShardSet(text), "train", 32, 4, 0)
    with pytest.raises(UserError, match="sampling: expected one of 'uniform', 'priority', got 'loud'"):
        build_table(DataConfig, {"sampling": "loud"}, "r [data]")


def test_priority_single_file_uses_the_train_part_only(tmp_path):
    codes_dir = write_codes(tmp_path / "one", 1, frames=400)
    AudioTokenizer("codebook0").save(tmp_path / "tok")
    pretokenize_codes(codes_dir, tmp_path / "tok", tmp_path / "shards", shard_tokens=1024)
    write_scores(codes_dir / "scores.parquet", chunk_rows(codes_dir))  # 20 chunks; the train part is 360 frames
    shards = ShardSet(tmp_path / "shards")
    train = PrioritySampler(shards, "train", 32, 4, 0, codes_dir / "scores.parquet")
    assert len(train.weights) == 18  # middles 10, 30, ..., 350
    assert train.chunk_offset.max() + 33 <= 361
    val = PrioritySampler(shards, "val", 16, 4, 0, codes_dir / "scores.parquet")
    assert len(val.weights) == 2  # middles 370, 390 -> frames 10 and 30 of the val part
    np.testing.assert_array_equal(val.chunk_offset, [1 + 10 - 8, 1 + 30 - 8])


# --- prepare(): a folder of code files as data.source ------------------------------------------------------


def audio_recipe(tmp_path, source, **tokenizer):
    from toolkit import recipe as recipe_lib

    raw = tomllib.loads(TINY_RECIPE)
    raw["tokenizer"] = {"kind": "audio", "layout": "codebook0", "n_sentinels": 4, **tokenizer}
    raw["data"] = {"source": str(source), "shard_tokens": 1024, "sampling": "priority"}
    return recipe_lib.from_dict(raw, str(tmp_path / "r.toml"))


def test_prepare_shards_a_codes_folder(tmp_path):
    from toolkit.shards.prepare import cache_root, prepare

    codes_dir = write_codes(tmp_path / "codes", 4)
    write_scores(codes_dir / "scores.parquet", chunk_rows(codes_dir))
    rec = audio_recipe(tmp_path, codes_dir)
    p = prepare(rec)
    assert p.corpus is None and p.tokenizer.kind == "audio" and p.tokenizer.layout == "codebook0"
    assert p.shards.parent == cache_root() / "shards" and not list(p.shards.parent.glob("*.partial"))
    shards = ShardSet(p.shards)
    shards.check_tokenizer(p.tokenizer)
    assert shards.meta["audio"]["codes_dir"] == str(codes_dir.resolve())
    assert len(shards.meta["audio"]["files"]["train"]) == 3
    assert isinstance(make_sampler(rec, shards, "train", 32, 4, 0), PrioritySampler)
    stamp = (p.shards / "meta.json").stat().st_mtime_ns
    write_scores(codes_dir / "scores.parquet", chunk_rows(codes_dir, priority=lambda p, c: 2.0))  # re-scored
    again = prepare(rec)
    assert again.shards == p.shards and (p.shards / "meta.json").stat().st_mtime_ns == stamp  # reused
    assert prepare(audio_recipe(tmp_path, codes_dir / "song0.npz")).shards != p.shards  # one file: split by time

    with pytest.raises(UserError, match=r"holds audio code files: set tokenizer.kind = \"audio\" \(the recipe has "
                                        r"'bytes'\)"):
        prepare(audio_recipe(tmp_path, codes_dir, kind="bytes"))
    tokenizers.build(TokenizerConfig(kind="bytes"), None, tmp_path / "bytes_tok")
    with pytest.raises(UserError, match="tokenizer.path .*bytes_tok is a bytes tokenizer; use an audio one"):
        prepare(audio_recipe(tmp_path, codes_dir, path=str(tmp_path / "bytes_tok")))


# --- rollout -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "tiny"
    tiny_codec().model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, music(4.0, seed=21), SR)
    return path


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """A randomly initialised tiny T5 over codebook0 tokens, saved as a run folder."""
    import torch

    from toolkit import models
    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib

    run = tmp_path_factory.mktemp("run") / "t5"
    run.mkdir()
    tok = AudioTokenizer("codebook0", n_sentinels=4)
    raw = {"name": "t5_tiny",
           "model": {"family": "t5", "dim": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16, "max_seq_len": 48,
                     "max_target_len": 24, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "eos_id": tok.eos_id,
                     "bos_id": tok.bos_id, "sentinel_start": tok.sentinel_start, "n_sentinels": tok.n_sentinels},
           "tokenizer": {"kind": "audio", "layout": "codebook0", "n_sentinels": 4},
           "train": {"device": "cpu", "dtype": "float32"}}
    rec = recipe_lib.from_dict(raw, "t5_tiny.toml")
    torch.manual_seed(0)
    model = models.build(rec.model, tok.vocab_size)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # zero-initialised: every token equally likely
    recipe_lib.save(rec, run / run_lib.RECIPE)
    tok.save(run / run_lib.TOKENIZER)
    run_lib.save_weights(model, run / run_lib.WEIGHTS, step=2)
    return run


def test_rollout_writes_tapes_and_wavs_of_the_expected_length(tmp_path, t5_run, codec_dir, song):
    from toolkit.audio.rollout import RolloutSettings, rollout

    s = RolloutSettings(samples=2, prompt_length=16, iterations=3, tokens_per_step=10, seed=3)
    out = tmp_path / "out"
    report = rollout(t5_run, out, s, audio_path=song, codec_name=str(codec_dir), device="cpu")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"song_{i}_{kind}.wav" for i in range(2) for kind in ("prompt", "rollout")] + ["song_rollout.npz",
                                                                                        "rollout.json"])
    with np.load(out / "song_rollout.npz", allow_pickle=False) as z:
        tapes, frames, prompts, modes, new = (z[k] for k in ("tapes", "tape_frames", "prompts", "modes",
                                                              "new_tokens"))
    assert list(modes) == ["continue"] * 3 and new.shape == (3, 2) and (new <= 10).all()
    assert prompts.shape == (2, 1, 16)
    for i in range(2):
        assert frames[i] == 16 + new[:, i].sum()
        np.testing.assert_array_equal(tapes[i, :, :16], prompts[i])  # the tape opens with its prompt
        assert (tapes[i, :, : frames[i]] >= 0).all() and (tapes[i, :, frames[i] :] == -1).all()
        assert sf.info(out / f"song_{i}_rollout.wav").frames == frames[i] * 320  # frames x hop samples
        assert sf.info(out / f"song_{i}_prompt.wav").frames == 16 * 320
    # the prompts are windows of the song's codebook 0
    codes = load_codes_of(song, codec_dir)
    for i in range(2):
        p = prompts[i, 0]
        assert any((codes[0, j : j + 16] == p).all() for j in range(codes.shape[1] - 15))
    saved = json.loads((out / "rollout.json").read_text())
    assert saved["iterations"] == report["iterations"] and saved["settings"]["seed"] == 3
    assert saved["seconds_generated"] == pytest.approx(new.sum() / 75, abs=1e-3)
    assert saved["generate_seconds"] > 0 and saved["wall_seconds"] >= saved["generate_seconds"]
    # reproducible with the seed; refuses to overwrite without force
    with pytest.raises(UserError, match="already exists; pass --force"):
        rollout(t5_run, out, s, audio_path=song, codec_name=str(codec_dir), device="cpu")
    rollout(t5_run, out, s, audio_path=song, codec_name=str(codec_dir), device="cpu", force=True)
    with np.load(out / "song_rollout.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["tapes"], tapes)


def load_codes_of(song, codec_dir):
    from toolkit.audio.codec import encode, load_codec
    from toolkit.audio.io import read_audio

    codec = load_codec(str(codec_dir), "cpu")
    return encode(codec, read_audio(song, codec.sample_rate), 1.5)


def test_rollout_infill_keeps_the_postfix(tmp_path, t5_run, codec_dir, song):
    from toolkit.audio.rollout import RolloutSettings, rollout

    s = RolloutSettings(samples=2, prompt_length=16, iterations=2, infill_prob=1.0, infill_length=6, seed=5)
    rollout(t5_run, tmp_path / "out", s, audio_path=song, codec_name=str(codec_dir), device="cpu")
    with np.load(tmp_path / "out" / "song_rollout.npz", allow_pickle=False) as z:
        tapes, frames, modes, new = z["tapes"][:, 0], z["tape_frames"], z["modes"], z["new_tokens"]
    assert list(modes) == ["infill", "infill"]
    for i in range(2):
        tape = tapes[i, : frames[i]]
        assert frames[i] == 16 + new[:, i].sum() + 2 * 8  # each in-fill adds [generated, postfix of 8]
        before = tape[: frames[i] - new[-1, i] - 8]  # the tape before the last iteration
        np.testing.assert_array_equal(tape[-8:], before[-16:][8:])  # it ends with the last context's postfix


def test_rollout_cli_from_codes_and_errors(capsys, tmp_path, t5_run, codec_dir, song):
    codes = tmp_path / "codes"
    assert lmkit(capsys, "-q", "audio", "encode", str(song), "-o", str(codes), "--codec", str(codec_dir),
                 "--device", "cpu")[0] == 0
    assert lmkit(capsys, "-q", "audio", "score", str(codes), "-o", str(codes / "scores.parquet"))[0] == 0
    out = tmp_path / "out"
    code, _, err = lmkit(capsys, "-q", "audio", "rollout", "--from-codes", str(codes), "--model", str(t5_run),
                         "-o", str(out), "--samples", "1", "--prompt-length", "12", "--iterations", "2",
                         "--tokens-per-step", "5", "--device", "cpu")
    assert code == 0, err
    report = json.loads((out / "rollout.json").read_text())
    assert report["mode"] == "codes" and report["codec"] == str(codec_dir.resolve())  # the code files' codec
    assert report["prompts"][0]["file"].endswith("song.npz")
    assert sf.info(out / "codes_0_rollout.wav").frames == report["tape_frames"][0] * 320

    code, _, err = lmkit(capsys, "audio", "rollout", str(song), "--from-codes", str(codes), "--model", str(t5_run),
                         "-o", str(out))
    assert code == 1 and "exactly one of AUDIO" in err
    code, _, err = lmkit(capsys, "audio", "rollout", "--model", str(t5_run), "-o", str(out))
    assert code == 1 and "exactly one of AUDIO" in err
    code, _, err = lmkit(capsys, "audio", "rollout", str(song), "--model", str(t5_run), "-o", str(tmp_path / "o2"),
                         "--prompt-length", "48", "--codec", str(codec_dir))
    assert code == 1 and "--prompt-length 48: the model's encoder takes 48 tokens" in err
    code, _, err = lmkit(capsys, "audio", "rollout", str(song), "--model", str(tmp_path), "-o", str(tmp_path / "o3"))
    assert code == 1 and "is not a run folder" in err


T5_AUDIO = """
name = "t5_audio_tiny"
[model]
family = "t5"
dim = 32
n_layers = 1
n_heads = 2
head_dim = 16
max_seq_len = 48
max_target_len = 32
[tokenizer]
kind = "audio"
layout = "codebook0"
n_sentinels = 8
[data]
source = "{source}"
sampling = "priority"
shard_tokens = 1024
[train]
device = "cpu"
dtype = "float32"
batch_size = 4
max_iters = 3
optimizer = "adam"
lr = 1e-3
warmup_iters = 0
eval_interval = 3
eval_iters = 1
log_interval = 1
"""


def test_train_t5_on_codes_with_priority_then_roll_out(capsys, tmp_path, codec_dir, song):
    """The issue's path end to end: encode, score, train with priority sampling, roll out from the run."""
    import shutil

    music_dir = tmp_path / "music"
    music_dir.mkdir()
    shutil.copy(song, music_dir / "s0.wav")
    for i in (1, 2):
        sf.write(music_dir / f"s{i}.wav", music(3.0, seed=30 + i), SR)
    codes = tmp_path / "codes"
    assert lmkit(capsys, "-q", "audio", "encode", str(music_dir), "-o", str(codes), "--codec", str(codec_dir),
                 "--bandwidth", "1.5", "--device", "cpu")[0] == 0
    assert lmkit(capsys, "-q", "audio", "score", str(codes), "-o", str(codes / "scores.parquet"))[0] == 0
    recipe = tmp_path / "t5_audio.toml"
    recipe.write_text(T5_AUDIO.format(source=codes.as_posix()))
    run = tmp_path / "run"
    code, _, err = lmkit(capsys, "-q", "train", str(recipe), "--set", f"train.out_dir={run}")
    assert code == 0, err
    code, _, err = lmkit(capsys, "-q", "audio", "rollout", str(music_dir / "s1.wav"), "--model", str(run), "-o",
                         str(tmp_path / "out"), "--samples", "2", "--prompt-length", "16", "--iterations", "2",
                         "--tokens-per-step", "64", "--infill-prob", "0.5", "--codec", str(codec_dir))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "rollout.json").read_text())
    assert report["step"] == 3 and len(report["iterations"]) == 2
    for i in range(2):
        assert sf.info(tmp_path / "out" / f"s1_{i}_rollout.wav").frames == report["tape_frames"][i] * 320
