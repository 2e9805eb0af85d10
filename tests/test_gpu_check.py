"""benchmarks/gpu.sh --dry: the GPU check's code paths (throughput, a budgeted training run on a text file, 2-process
DDP and FSDP) on the CPU with tiny shapes, and the JSON it prints."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import make_text

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_runs_every_part_and_prints_its_json(tmp_path):
    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(make_text(10, seed=i) for i in range(200)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry", "--data", str(text), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry"] is True and {"torch", "gpus"} <= report["env"].keys()
    assert [t["shape"] for t in report["throughput"]] == ["tinystories15m", "llama110m"]
    for t in report["throughput"]:
        assert "error" not in t, t
        assert t["tokens_per_s"] > 0 and t["mfu"] is not None and t["params"] > 0
    train = report["train"]
    assert "error" not in train, train
    assert train["steps"] > 0 and train["val_bpb"] > 0 and train["tokens_per_s"] > 0
    for mode in ("ddp", "fsdp"):
        run = report["parallel"][mode]
        assert "error" not in run, run
        assert run["world"] == 2 and run["steps"] == 6 and run["tokens_per_s"] > 0
    # fp32, the same recipe and data: DDP and FSDP train the same model
    assert report["parallel"]["fsdp"]["val_bpb"] == pytest.approx(report["parallel"]["ddp"]["val_bpb"], rel=1e-4)
