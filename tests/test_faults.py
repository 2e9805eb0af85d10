"""kill -9 during training, small: benchmarks/faults.py with 3 kills at fixed moments (its logic, imported)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_faults():
    spec = importlib.util.spec_from_file_location("lmkit_benchmark_faults", ROOT / "benchmarks" / "faults.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


faults = load_faults()
INTERVAL = 3  # checkpoints at steps 3, 6, 9, ...; evals at 6, 12, 18

TRIGGERS = [
    faults.Trigger("step", step=2),  # before the first checkpoint: no state.pt, so a fresh start (--force)
    faults.Trigger("tmp", name="state.pt", step=4),  # the checkpoint at step 6, between its two renames
    faults.Trigger("tmp", name=faults.WEIGHTS_TMP, step=1),  # the next checkpoint, inside the weights write
]


def test_kill_9_at_three_moments_then_resume_ends_bit_for_bit(tmp_path):
    report = faults.experiment(tmp_path, kills=len(TRIGGERS), interval=INTERVAL, slow=0.2, max_iters=18,
                               triggers=lambda i, start: TRIGGERS[i], timeout=60)
    details = report["details"]
    assert report["failures"] == [], report
    assert report["kills"] == 3 and report["resumes_ok"] == report["resumes"] == 3, report
    assert report["corrupt_folders"] == 0, details
    assert report["max_steps_lost"] <= INTERVAL, details
    assert report["final_rc"] == 0 and report["final_step"] == 18
    assert report["bitwise_equal"]
    assert report["stale_locks"] == 3  # each kill left train.lock with its pid; each resume took it over
    # the kills landed where they were aimed
    assert details[0]["resumed_from"] == 0 and details[0]["tmp_left"] in ([], ["model.next.safetensors.tmp"])
    assert details[1]["tmp_left"] == ["state.pt.tmp"] and details[1]["progress"] == 6
    assert details[2]["tmp_left"] == ["model.next.safetensors.tmp"]


def test_a_stale_lock_is_taken_over(tmp_path):
    """A killed trainer's train.lock names a pid that is gone: the next `lmkit train` takes it over."""
    from toolkit import run as run_lib

    (tmp_path / run_lib.LOCK).write_text("999999999\n")
    assert run_lib.lock(tmp_path).read_text().strip() == str(os.getpid())
    run_lib.unlock(tmp_path)
    assert not (tmp_path / run_lib.LOCK).exists()


@pytest.mark.parametrize("value", ["", "0"])
def test_the_slow_write_hook_is_off_unless_set(tmp_path, monkeypatch, value):
    import time

    from toolkit.fsio import atomic_write_text

    monkeypatch.setenv("LMKIT_SLOW_WRITES", value)
    t0 = time.perf_counter()
    atomic_write_text(tmp_path / "a.txt", "x")
    assert time.perf_counter() - t0 < 0.5 and (tmp_path / "a.txt").read_text() == "x"


@pytest.mark.parametrize("committed", [True, False])
def test_a_kill_beside_the_commit_resumes_from_a_matching_pair(tmp_path, one_thread, committed):
    """The instant no slow write can widen: a kill after state.pt's rename but before the new weights' (committed)
    or after the new weights were written but before state.pt's rename (not): resume takes the matching pair."""
    from safetensors.torch import load_file

    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib
    from toolkit.train.loop import NEXT_WEIGHTS, train

    r = recipe_lib.load(faults.write_recipe(tmp_path, max_iters=12, interval=INTERVAL))
    train(r, tmp_path / "straight")
    run = tmp_path / "run"
    train(r, run, stop_after=3)
    w3, s3 = (run / run_lib.WEIGHTS).read_bytes(), (run / run_lib.STATE).read_bytes()
    resumed = recipe_lib.load(run / run_lib.RECIPE)
    train(resumed, run, resume=True, stop_after=3)
    (run / NEXT_WEIGHTS).write_bytes((run / run_lib.WEIGHTS).read_bytes())  # step 6's weights, not yet in place
    (run / run_lib.WEIGHTS).write_bytes(w3)
    if not committed:
        (run / run_lib.STATE).write_bytes(s3)
    assert train(resumed, run, resume=True)["step"] == 12
    assert not (run / NEXT_WEIGHTS).exists()
    starts = [m["step"] for m in map(faults.json.loads, (run / run_lib.METRICS).read_text().splitlines())]
    assert starts == sorted(starts)  # metrics cut back to the checkpoint resumed from, then continued
    a, b = load_file(tmp_path / "straight" / run_lib.WEIGHTS), load_file(run / run_lib.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
