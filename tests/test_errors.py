"""Mistakes a user can make, and faults a run can meet: each ends in one clear line, and nothing is lost."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import lmkit

from toolkit import recipe as recipe_lib
from toolkit import run as run_lib
from toolkit.errors import UserError
from toolkit.shards.format import ShardSet, shard_header


def write_llmc_shard(path, tokens):
    tokens = np.asarray(tokens, dtype=np.uint16)
    with open(path, "wb") as f:
        f.write(shard_header(len(tokens), np.uint16).tobytes())
        f.write(tokens.tobytes())


def test_shards_named_train_and_val_are_split_by_name_not_by_order(tmp_path, capsys):
    """attn_demo's layout: tinystories_train_000000.bin sorts before ..._val_...; llama2.c's rule would make the
    train file the val split."""
    folder = tmp_path / "bins"
    folder.mkdir()
    write_llmc_shard(folder / "tinystories_train_000000.bin", np.arange(5000) % 250)
    write_llmc_shard(folder / "tinystories_val_000000.bin", np.arange(600) % 250)
    shards = ShardSet(folder)
    assert shards.tokens("train") == 5000 and shards.tokens("val") == 600
    assert "file name" in shards.split_rule
    code, _, err = lmkit(capsys, "pretokenize", str(folder), "-o", str(tmp_path / "out"), "--tokenizer",
                         _bytes_tokenizer(tmp_path))
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokens"] == {"train": 5000, "val": 600}
    assert "file name" in err and "5,000 train / 600 val" in err


def test_unnamed_bins_keep_llama2cs_rule_and_say_so(tmp_path):
    folder = tmp_path / "bins"
    folder.mkdir()
    write_llmc_shard(folder / "data00.bin", np.arange(700) % 250)
    write_llmc_shard(folder / "data01.bin", np.arange(3000) % 250)
    shards = ShardSet(folder)
    assert shards.tokens("val") == 700 and shards.tokens("train") == 3000
    assert "first sorted file is val" in shards.split_rule


def _bytes_tokenizer(tmp_path) -> str:
    from toolkit.tokenizers.bytes import BytesTokenizer

    out = tmp_path / "tok"
    BytesTokenizer(n_sentinels=0).save(out)
    return str(out)


def test_recipe_errors_keep_their_table_name(tmp_path, capsys):
    bad = tmp_path / "badkey.toml"
    bad.write_text('name = "bad"\n[model]\nfamily = "llama"\nfoo = 1\n')
    code, _, err = lmkit(capsys, "train", str(bad), "-o", str(tmp_path / "run"))
    assert code == 1
    assert "[model]: unknown key 'foo'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_negative_temperature_is_refused(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert lmkit(capsys, "train", str(tiny_recipe), "-o", str(run), "--set", "train.max_iters=2")[0] == 0
    code, out, err = lmkit(capsys, "chat", str(run), "--prompt", "a", "-t", "-1", "-n", "3")
    assert code == 1 and "--temperature -1" in err and out == ""


def test_an_unknown_device_is_one_line(tmp_path, capsys):
    code, out, err = lmkit(capsys, "chat", str(tmp_path / "run"), "--device", "gpu0", "--prompt", "a")
    assert code == 1 and "--device gpu0: expected auto, cpu, cuda, cuda:N or mps" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_second_train_into_the_same_run_folder_is_refused(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / run_lib.LOCK).write_text(f"{owner.pid}\n")
        r = recipe_lib.load(tiny_recipe, ["train.max_iters=2"])
        from toolkit.train.loop import train

        with pytest.raises(UserError, match=f"being trained by process {owner.pid}"):
            train(r, run, force=True)
        assert (run / run_lib.LOCK).read_text().strip() == str(owner.pid)  # the owner's lock is left alone
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone: its lock is stale, taken over, and released at the end
    assert train(r, run, force=True)["step"] == 2
    assert not (run / run_lib.LOCK).exists()


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    from toolkit.train.loop import train

    run = tmp_path / "run"
    r = recipe_lib.load(tiny_recipe, ["train.max_iters=8", "train.eval_interval=4"])
    import safetensors.torch

    real = safetensors.torch.save_file  # what run.save_weights calls
    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 8): a partial file, then the disk is full
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(UserError) as e:
        train(r, run)
    from toolkit.train.loop import NEXT_WEIGHTS

    assert str(e.value) == f"cannot write {run / NEXT_WEIGHTS}: the disk is full"  # the new weights, not yet in place
    assert not list(run.glob("*.tmp"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert run_lib.load_run(run).step == 4 == run_lib.load_state(run / run_lib.STATE)["step"]
    assert train(recipe_lib.load(run / run_lib.RECIPE, ["train.max_iters=8"]), run, resume=True)["step"] == 8


def test_a_jsonl_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    bad = tmp_path / "docs.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, _, err = lmkit(capsys, "data", str(bad), "-o", str(tmp_path / "corpus"))
    assert code == 1 and f"{bad}:2: not UTF-8 text (byte 0xe9" in err and "Traceback" not in err


def test_audio_files_that_are_not_what_their_name_says(tmp_path, capsys):
    import soundfile as sf

    from toolkit.audio.io import read_audio

    fake = tmp_path / "song.mp3"
    fake.write_text("this is text, not audio")
    with pytest.raises(UserError, match="not an audio file it can decode") as e:
        read_audio(fake, 24000)
    assert "does not exist" not in str(e.value)
    whole = tmp_path / "whole.wav"
    sf.write(whole, np.zeros(48000, np.float32), 24000)
    assert len(read_audio(whole, 24000)) == 48000
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(UserError, match=r"truncated: its header declares 96,000 bytes of audio, the file holds 1,956"):
        read_audio(cut, 24000)
    for name in ("song.mp3", "cut.wav"):
        code, _, err = lmkit(capsys, "audio", "info", str(tmp_path / name))
        assert code == 1 and "not a code file" in err
        assert "pickle" not in err.lower()


def test_a_code_file_with_pickled_objects_is_refused_without_advice_to_unpickle(tmp_path, capsys):
    bad = tmp_path / "codes.npz"
    np.savez(bad, codes=np.array([{"a": 1}], dtype=object))
    code, _, err = lmkit(capsys, "audio", "info", str(bad))
    assert code == 1 and "pickled objects" in err and "allow_pickle" not in err


def test_init_from_takes_the_base_runs_model_and_refuses_a_contradiction(tiny_recipe, tmp_path, capsys):
    base = tmp_path / "base"
    assert lmkit(capsys, "train", str(tiny_recipe), "-o", str(base), "--set", "train.max_iters=2")[0] == 0
    text = tiny_recipe.read_text()
    head, rest = text.split("[model]", 1)
    tune = tmp_path / "tune.toml"
    tune.write_text(head + '[model]\nfamily = "llama"\ndropout = 0.1\n' + rest[rest.index("[tokenizer]"):])
    code, out, err = lmkit(capsys, "train", str(tune), "-o", str(tmp_path / "ft"), "--init-from", str(base),
                           "--set", "train.max_iters=2")
    assert code == 0, err
    saved = recipe_lib.load(tmp_path / "ft" / run_lib.RECIPE).model
    base_model = recipe_lib.load(base / run_lib.RECIPE).model
    assert (saved.dim, saved.n_layers, saved.n_kv_heads, saved.vocab_size) == \
        (base_model.dim, base_model.n_layers, base_model.n_kv_heads, base_model.vocab_size)
    assert saved.dropout == 0.1
    code, _, err = lmkit(capsys, "train", str(tune), "-o", str(tmp_path / "ft2"), "--init-from", str(base),
                         "--set", "model.dim=64")
    assert code == 1 and f"dim = 64, but the --init-from run {base} has dim = 32" in err
