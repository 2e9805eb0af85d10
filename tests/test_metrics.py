"""What a run leaves beside its loss: samples at every eval, curves, TensorBoard event files."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import lmkit

from toolkit import recipe as recipe_lib
from toolkit.train.loop import train

PROMPTS = 'eval.prompts=["Once upon a time", "The dog"]'


def samples(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_samples_at_every_eval_one_row_per_prompt_and_deterministic(tiny_recipe, tmp_path):
    sets = ["train.max_iters=6", "train.eval_interval=3", PROMPTS, "eval.sample_tokens=12", "train.plot=false"]
    train(recipe_lib.load(tiny_recipe, sets), tmp_path / "a")
    rows = samples(tmp_path / "a")
    assert [(r["step"], r["prompt"]) for r in rows] == [(3, "Once upon a time"), (3, "The dog"),
                                                         (6, "Once upon a time"), (6, "The dog")]
    assert all(0 < r["tokens"] <= 12 and isinstance(r["text"], str) and r["tokens_per_s"] > 0 for r in rows)
    train(recipe_lib.load(tiny_recipe, sets), tmp_path / "b")
    assert [r["text"] for r in samples(tmp_path / "b")] == [r["text"] for r in rows]  # same seed, same text
    assert not (tmp_path / "a" / "curves.png").exists()


def test_samples_do_not_disturb_a_bit_for_bit_resume(tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    sets = ["train.max_iters=6", "train.eval_interval=2", PROMPTS, "eval.sample_tokens=4"]
    train(recipe_lib.load(tiny_recipe, sets), tmp_path / "straight")
    train(recipe_lib.load(tiny_recipe, sets), tmp_path / "split", stop_after=3)
    train(recipe_lib.load(tmp_path / "split" / "recipe.toml"), tmp_path / "split", resume=True)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert samples(tmp_path / "split") == [dict(r, tokens_per_s=s["tokens_per_s"]) for r, s in
                                           zip(samples(tmp_path / "straight"), samples(tmp_path / "split"))]


def test_plot_overlays_runs_with_a_legend(tiny_recipe, tmp_path, capsys):
    from toolkit.plot import plot_runs

    for name in ("one", "two"):
        train(recipe_lib.load(tiny_recipe, ["train.max_iters=4", "train.eval_interval=2", "train.log_interval=1"]),
              tmp_path / name)
    assert (tmp_path / "one" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written at each eval
    fig = plot_runs([tmp_path / "one", tmp_path / "two"], tmp_path / "c.png", metrics=["val_bpb"])
    assert len(fig.axes) == 4 and tuple(fig.get_size_inches()) == (7, 2.4 * 4)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["one train", "one val", "two train", "two val"]
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [32 * 4 * 2 * i for i in range(1, 5)]  # tokens: batch 4 x grad_accum 2 x seq 32 per step
    code, _, err = lmkit(capsys, "plot", str(tmp_path / "one"), str(tmp_path / "two"), "-o", str(tmp_path / "p.png"))
    assert code == 0, err
    assert (tmp_path / "p.png").stat().st_size > 10_000
    code, _, err = lmkit(capsys, "plot", str(tmp_path / "one"), "--metric", "nope", "-o", str(tmp_path / "q.png"))
    assert code == 1 and "--metric nope: no run logged it" in err


def read_events(folder):
    """TensorBoard event files read with the TFRecord framing and the Event proto, not through our writer."""
    from tensorboardX.proto import event_pb2

    scalars, texts = {}, []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.tag.startswith("sample/"):
                    texts.append((event.step, v.tag))
    return scalars, texts


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_recipe, tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    code, _, err = lmkit(capsys, "train", str(tiny_recipe), "-o", str(run), "--tensorboard", "--set",
                         "train.max_iters=4", "--set", "train.eval_interval=2", "--set", "train.log_interval=1",
                         "--set", 'eval.prompts=["Once"]', "--set", "eval.sample_tokens=3")
    assert code == 0, err
    scalars, texts = read_events(run / "tensorboard")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(s, pytest.approx(v)) for s, v in scalars["loss"]] == [(r["step"], r["loss"]) for r in logged
                                                                    if "loss" in r]
    assert [s for s, _ in scalars["val_loss"]] == [2, 4]
    assert [s for s, _ in texts] == [2, 4]
    # converting afterwards gives the same scalars
    code, _, err = lmkit(capsys, "plot", str(run), "--tensorboard")
    assert code == 0, err


def test_a_t5_run_samples_a_denoising_example(tmp_path, capsys):
    from conftest import make_text
    from test_t5 import TINY

    src = tmp_path / "docs"
    src.mkdir()
    for i in range(30):
        (src / f"d{i}.txt").write_text(make_text(30, seed=i))
    recipe = tmp_path / "t5.toml"
    recipe.write_text(TINY.format(source=src.as_posix()))
    code, _, err = lmkit(capsys, "train", str(recipe), "--set", f"train.out_dir={tmp_path / 'run'}", "--set",
                         "train.max_iters=4", "--set", "train.eval_interval=4", "--set", 'eval.prompts=["denoise"]',
                         "--set", "eval.sample_tokens=8")
    assert code == 0, err
    (row,) = samples(tmp_path / "run")
    assert row["step"] == 4 and row["tokens"] <= 8
    assert {"prompt", "target", "text"} <= set(row) and row["prompt"] and row["target"]
