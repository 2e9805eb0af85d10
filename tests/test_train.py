import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import lmkit
from safetensors.torch import load_file

from toolkit import models
from toolkit import recipe as recipe_lib
from toolkit import run as run_lib
from toolkit.errors import UserError
from toolkit.shards.format import ShardSet
from toolkit.shards.sampler import eval_windows
from toolkit.train.loop import train

ROOT = Path(__file__).resolve().parent.parent


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run) if "loss" in m]


def test_train_writes_a_complete_run_folder_and_learns(tiny_recipe, tmp_path):
    r = recipe_lib.load(tiny_recipe, ["train.max_iters=40", "train.eval_interval=20"])
    summary = train(r, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("model.safetensors", "recipe.toml", "state.pt", "metrics.jsonl", "run.json", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    evals = [m for m in metrics(run) if "val_loss" in m]
    assert [m["step"] for m in evals] == [20, 40]
    assert evals[-1]["val_loss"] < math.log(259) - 1.0  # far below uniform over the byte vocabulary
    assert summary["step"] == 40 and summary["val_bpb"] > 0
    loaded = run_lib.load_run(run)
    assert loaded.step == 40 and loaded.recipe.model.vocab_size == 259
    with pytest.raises(UserError, match="already holds a run; use --resume"):
        train(r, run)


def test_resume_equals_uninterrupted_bit_for_bit(tiny_recipe, tmp_path):
    r = recipe_lib.load(tiny_recipe)
    train(r, tmp_path / "straight")
    assert train(r, tmp_path / "split", stop_after=5)["stopped_early"]
    resumed = recipe_lib.load(tmp_path / "split" / "recipe.toml")
    train(resumed, tmp_path / "split", resume=True)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_resume_of_a_shipped_recipe_is_bit_for_bit(tmp_path):
    """The path users take: `lmkit train stories260k` (sentencepiece, dropout, its own optimizer settings), stopped
    and resumed in new processes, ends with the same weights as one uninterrupted run. (In one process the
    CPU's measured peak FLOPs are cached, which once hid a resume that drew dropout from a shifted RNG.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    sets = []
    for s in ("model.max_seq_len=64", "train.batch_size=4", "train.max_iters=10", "train.eval_interval=4",
              "train.eval_iters=1", "train.warmup_iters=2", "train.dtype=float32", "train.device=cpu",
              "data.synthetic_stories=300"):
        sets += ["--set", s]

    def lmkit_run(*args):
        p = subprocess.run([sys.executable, "-m", "toolkit", "--quiet", "train", *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    lmkit_run("stories260k", "--out", str(tmp_path / "straight"), *sets)
    assert lmkit_run("stories260k", "--out", str(tmp_path / "split"), "--stop-after", "6", *sets)["step"] == 6
    assert lmkit_run(str(tmp_path / "split"), "--resume")["step"] == 10
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    from toolkit.models import llama

    calls = {"n": 0}
    forward = llama.Model.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 8:  # grad_accum 2: from step 9 on
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(llama.Model, "forward", poisoned)
    r = recipe_lib.load(tiny_recipe, ["train.eval_interval=4", "train.log_interval=3"])
    with pytest.raises(UserError, match="loss became nan at step 9; stopped"):
        train(r, tmp_path / "run")
    kept = run_lib.load_run(tmp_path / "run")
    assert kept.step == 8 and all(torch.isfinite(p).all() for p in kept.model.parameters())


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    train(recipe_lib.load(tiny_recipe, ["train.max_iters=6"]), run)
    r = recipe_lib.load(run / "recipe.toml", ["train.max_iters=12"])
    good = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read the training state"):
        train(r, run, resume=True)
    (run / "state.pt").write_bytes(good)
    run_lib.save_weights(run_lib.load_run(run).model, run / "model.safetensors", step=3)
    with pytest.raises(UserError, match="model.safetensors is from step 3 but state.pt from step 6"):
        train(r, run, resume=True)
    (run / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        run_lib.load_run(run)
    wrong = recipe_lib.load(tiny_recipe, ["model.dim=64"])
    recipe_lib.save(wrong, run / "recipe.toml")
    run_lib.save_weights(models.build(recipe_lib.load(tiny_recipe).model, 259), run / "model.safetensors")
    with pytest.raises(UserError, match="has shape .* the recipe's model needs"):
        run_lib.load_run(run)


def test_eval_equals_a_direct_computation(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe_lib.load(tiny_recipe), run)
    code, out, err = lmkit(capsys, "eval", str(run), "--json", "--batches", "3", "--device", "cpu")
    assert code == 0, err
    got = json.loads(out)
    loaded = run_lib.load_run(run)
    shards = ShardSet(json.loads((run / "run.json").read_text())["data"]["shards"])
    total, n, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for x, y in eval_windows(shards, "val", 32, 4, 3):  # eval batch = train batch 4
            for row_x, row_y in zip(x, y):  # one window at a time, plain cross-entropy
                logits = loaded.model(torch.tensor(row_x)[None])[0][0]
                total += F.cross_entropy(logits, torch.tensor(row_y), reduction="sum").item()
                n += len(row_y)
                nbytes += int((torch.tensor(row_y) < 256).sum())
    assert got["tokens"] == n == 3 * 4 * 32
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert got["bpb"] == pytest.approx(total / n / math.log(2) * n / nbytes, rel=1e-5)
    text = tmp_path / "held_out.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. " * 30)
    code, out, err = lmkit(capsys, "eval", str(run), "--data", str(text), "--json", "--device", "cpu")
    assert code == 0, err
    held_out = json.loads(out)
    assert held_out["data"] == str(text) and held_out["tokens"] > 0 and held_out["windows"] > 0
    assert held_out["loss"] != pytest.approx(got["loss"])  # other text, another number


def test_cli_train_resume_and_errors(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = lmkit(capsys, "train", str(tiny_recipe), "--out", str(run), "--set", "train.max_iters=4")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 4
    code, out, err = lmkit(capsys, "train", str(run), "--resume", "--set", "train.max_iters=6")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 6
    code, _, err = lmkit(capsys, "train", str(run))
    assert code == 1 and "add --resume" in err
    code, _, err = lmkit(capsys, "train", str(tiny_recipe), "--out", str(tmp_path / "r2"), "--set",
                         "data.source=/no/such/folder")
    assert code == 1 and "data source not found" in err and "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_recipe, tmp_path):
    """A real SIGINT, delivered during step 3 (the process signals itself from inside that step), ends the run
    after step 3 with a checkpoint of step 3 and exit code 0."""
    run = tmp_path / "run"
    code = """
import os, signal, sys
from toolkit.cli import main
from toolkit.train import loop
real_step, calls = loop.train_step, []
def step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return real_step(*args, **kwargs)
loop.train_step = step
main(sys.argv[1:])
"""
    proc = subprocess.run([sys.executable, "-c", code, "train", str(tiny_recipe), "--out", str(run), "--set",
                           "train.max_iters=100000", "--set", "train.eval_interval=100000"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["stopped_early"] and summary["step"] == 3
    assert run_lib.load_state(run / "state.pt")["step"] == 3 == run_lib.load_run(run).step
    assert "--resume" in proc.stderr


def test_ddp_two_gloo_processes_equal_a_single_process(tiny_recipe, tmp_path):
    single = tmp_path / "single"
    train(recipe_lib.load(tiny_recipe, ["train.max_iters=5", "train.eval_interval=5"]), single)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "toolkit", "train", str(tiny_recipe), "--out", str(tmp_path / "ddp"),
                           "--set", "train.max_iters=5", "--set", "train.eval_interval=5",
                           "--set", 'eval.prompts=["Once upon"]'],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2
    samples = (tmp_path / "ddp" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 1 and json.loads(samples[0])["step"] == 5  # rank 0 alone samples
    a, b = train_losses(single), train_losses(tmp_path / "ddp")
    assert len(a) == len(b) == 5
    assert a == pytest.approx(b, rel=1e-5)
    wa, wb = load_file(single / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("attention", ["sdpa", "auto"])  # auto: matmul attention in bf16 on CPU
def test_bf16_autocast_tracks_the_fp32_loss_curve(tiny_recipe, tmp_path, attention):
    from toolkit.device import cpu_bf16_supported

    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16")
    train(recipe_lib.load(tiny_recipe, ["train.dtype=float32"]), tmp_path / "fp32")
    train(recipe_lib.load(tiny_recipe, ["train.dtype=bfloat16", f"model.attention={attention}"]), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["dtype"] == "bfloat16"
    a, b = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert a != b  # autocast really ran in bf16
    assert b == pytest.approx(a, rel=0.02)  # fp32 master weights: the curves agree


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_clipping_equals_clip_grad_norm(fused):
    """train_step clips as torch's clip_grad_norm_ does: a fused optimizer takes the factor as its grad_scale
    (for this step only), another gets scaled gradients; a norm within the limit changes nothing."""
    from toolkit.train.loop import train_step

    def run(clip_by_hand: bool, max_norm: float):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model

            def forward(self, x, y):
                out = self.net(x)
                return out, 100 * F.mse_loss(out, y)

        wrapped = Wrapped()
        for _ in range(3):
            x, y = torch.randn(32, 8), torch.randn(32, 4)
            if clip_by_hand:
                loss = wrapped(x, y)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                train_step(wrapped, wrapped, [opt], [(x, y)], contextlib.nullcontext(), max_norm)
                assert not hasattr(opt, "grad_scale")
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    for max_norm in (0.5, 1e6):  # clipped at every step; never clipped
        assert torch.allclose(run(False, max_norm), run(True, max_norm), atol=1e-6)
    assert not torch.allclose(run(False, 0.5), run(False, 1e6), atol=1e-3)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_cpu_training_keeps_freed_memory_unless_the_user_set_malloc(tiny_recipe, tmp_path):
    """The trainer applies keep_freed_memory() on CPU (glibc keeps freed blocks instead of mapping fresh pages
    every step); a user's MALLOC_* setting wins and it is not applied."""
    code = """
import sys
from toolkit.device import keep_freed_memory
from toolkit.train import loop
applied = []
def keep():
    applied.append(keep_freed_memory())
    return applied[-1]
loop.keep_freed_memory = keep
from toolkit import recipe
loop.train(recipe.load(sys.argv[1], ["train.max_iters=1", "train.eval_interval=1"]), sys.argv[2])
print(applied)
"""
    def run(env: dict) -> str:
        out = subprocess.run([sys.executable, "-c", code, str(tiny_recipe), str(tmp_path / f"r{len(env)}")],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert run({}) == "[True]"  # called once, and it applied
    assert run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "[False]"
