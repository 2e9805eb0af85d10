"""What one GPU machine does with lmkit, as one JSON object (benchmarks/gpu.sh runs it; about 8 minutes on an H200).

    python benchmarks/gpu_check.py --data path/to/tinystories_train_head.txt [--out DIR] [--train-minutes 3]
    python benchmarks/gpu_check.py --dry          # the same code paths on the CPU, tiny shapes, seconds

  throughput  tokens/s and MFU of the trainer's own step (benchmarks/train_throughput.py, random tokens, bf16,
              torch.compile): the tinystories15m shape (batch 128 x 256) and a 110 M llama (768/12/12, vocab
              32000, seq 1024)
  parallel    tokens/s of 2-process DDP and FSDP runs of the tinystories15m shape (`lmkit train` under torchrun),
              where there is more than one GPU (--dry: 2 gloo processes on the CPU)
  train       `lmkit train tinystories15m` on the text of --data for --train-minutes (train.max_minutes: the
              schedule, the final eval and checkpoint inside it); its val bits per byte, steps and tokens/s

Each part runs in its own process (lmkit's own commands), so one that fails is reported with its error and the
others still run. Nothing here reaches the network; the text comes from --data only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tinystories15m.toml"
LLAMA_110M = ["model.dim=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=12",
              "model.vocab_size=32000", "model.max_seq_len=1024"]
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.vocab_size=256",
        "model.max_seq_len=32"]


def sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[dict | None, dict]:
    """Run `cmd`; (its last stdout line as JSON or None, {wall_s, and error: the stderr's tail when it failed})."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, {"wall_s": round(time.perf_counter() - t0, 1), "error": f"timed out after {timeout:.0f} s"}
    meta = {"wall_s": round(time.perf_counter() - t0, 1)}
    found = None
    for line in p.stdout.splitlines():  # under torchrun every rank prints its summary, sometimes on one line
        try:
            found = json.JSONDecoder().raw_decode(line.strip())[0] if line.startswith("{") else found
        except json.JSONDecodeError:
            pass
    if p.returncode != 0 or not isinstance(found, dict):
        meta["error"] = f"exit {p.returncode}: " + " | ".join(p.stderr.strip().splitlines()[-6:])[-1500:]
        return None, meta
    return found, meta


def throughput(args, name: str, batch: int, seq: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), str(RECIPE), "--batch", str(batch),
           "--seq", str(seq), "--set", "train.grad_accum=1"] + sets(overrides)
    if args.dry:
        cmd += ["--dtype", "float32", "--device", "cpu", "--warmup", "1", "--steps", "2"]
    else:
        cmd += ["--dtype", "bfloat16", "--compile", "--warmup", "3", "--steps", "20", "--repeats", "3"]
    out, meta = run(cmd, timeout=120 if args.dry else 420)
    keep = ("params", "device", "dtype", "compile", "batch", "seq", "tokens_per_s", "mfu", "ms_per_step",
            "best_ms_per_step", "peak_flops", "flops_per_token", "warmup_s")
    return {"shape": name, **({k: out.get(k) for k in keep} if out else {}), **meta}


def data_sets(args) -> list[str]:
    if args.data:
        return [f"data.source={Path(args.data).resolve()}", f"data.max_chars={args.max_chars}",
                "data.val_fraction=0.01"]
    return ["data.source=synthetic"] + (["data.synthetic_stories=300"] if args.dry else [])  # no --data


def model_sets(args) -> list[str]:
    if args.dry:  # bytes: no tokenizer training on a few KB of text
        return TINY + ["tokenizer.kind=bytes", "tokenizer.n_sentinels=0", "model.vocab_size=0", "train.batch_size=4",
                       "train.dtype=float32", "train.compile=false", "train.device=cpu", "train.eval_iters=2"]
    # sentencepiece 4096 learns its pieces from 300k lines: seconds, where all of a large --data takes minutes
    return ["tokenizer.max_sentences=300000", "train.batch_size=128", "train.dtype=bfloat16", "train.compile=true",
            "train.eval_iters=50"]


def lmkit_env(args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "LMKIT_CACHE": str(args.out / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.dry:
        env["OMP_NUM_THREADS"] = "1"
    return env


def parallel(args, mode: str, gpus: int) -> dict:
    """tokens/s of a 2-process run under torchrun: the median of its logged windows after the first (compile)."""
    if not args.dry and gpus < 2:
        return {"skipped": f"{gpus} GPU: needs 2"}
    folder = args.out / f"parallel_{mode}"
    steps = 6 if args.dry else 120
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "toolkit",
           "--quiet", "train", str(RECIPE), "--out", str(folder), "--force"] + sets(
        data_sets(args) + model_sets(args) + [f"train.parallel={mode}", "train.grad_accum=2", f"train.max_iters={steps}",
                                              f"train.log_interval={2 if args.dry else 20}", "train.warmup_iters=2",
                                              f"train.eval_interval={steps}", "train.plot=false"])
    out, meta = run(cmd, timeout=120 if args.dry else 300, env=lmkit_env(args))
    if out is None:
        return {"world": 2, **meta}
    windows = [r["tokens_per_s"] for r in _metrics(folder) if "tokens_per_s" in r][1:]
    return {"world": 2, "steps": out["step"], "tokens_per_s": round(statistics.median(windows), 1) if windows else None,
            "val_bpb": out.get("val_bpb"), **meta}


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_run(args) -> dict:
    if not args.data and not args.dry:
        return {"skipped": "no --data (a TinyStories text file)"}
    folder = args.out / "train"
    minutes = args.train_minutes if not args.dry else min(args.train_minutes, 0.05)
    cmd = [sys.executable, "-m", "toolkit", "--quiet", "train", str(RECIPE), "--out", str(folder), "--force"] + sets(
        data_sets(args) + model_sets(args) + ["train.grad_accum=1", f"train.max_minutes={minutes}",
                                              "train.warmup_iters=100" if not args.dry else "train.warmup_iters=2",
                                              "train.eval_interval=1000000000", "train.plot=false"])
    out, meta = run(cmd, timeout=60 * minutes + (90 if args.dry else 300), env=lmkit_env(args))
    if out is None:
        return meta
    info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    windows = [r["tokens_per_s"] for r in _metrics(folder) if "tokens_per_s" in r][1:]
    return {"minutes": minutes, "steps": out["step"], "params": out["params"], "val_loss": out.get("val_loss"),
            "val_bpb": out.get("val_bpb"), "tokens_per_s": round(statistics.median(windows), 1) if windows else None,
            "mfu": out.get("mfu"), "train_tokens": info.get("data", {}).get("train_tokens"),
            "val_tokens": info.get("data", {}).get("val_tokens"), "device": info.get("device"),
            "dtype": info.get("dtype"), **meta}


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
           "python": sys.version.split()[0]}
    if env["gpus"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    missing = []
    for name in ("numpy", "typer", "rich", "safetensors", "sentencepiece", "tomli_w"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:  # no registry on such a machine: bring wheels (benchmarks/gpu.sh installs .whl/*.whl)
        env["missing_packages"] = missing
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="the same code paths on the CPU: tiny shapes, seconds")
    ap.add_argument("--data", default="", help="a TinyStories text file (stories separated by <|endoftext|>)")
    ap.add_argument("--max-chars", type=int, default=100_000_000, help="of --data (0 = all)")
    ap.add_argument("--train-minutes", type=float, default=3.0)
    ap.add_argument("--out", default="", help="folder for the runs and gpu_check.json (default: a temporary one)")
    ap.add_argument("--skip", action="append", default=[], choices=["throughput", "parallel", "train"])
    args = ap.parse_args()
    args.out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = environment()
    report: dict = {"dry": args.dry, "env": env}
    if "throughput" not in args.skip:
        if args.dry:
            shapes = [("tinystories15m", 4, 32, TINY), ("llama110m", 2, 32, TINY + ["model.dim=64", "model.n_heads=4",
                                                                                     "model.n_kv_heads=4"])]
        else:
            shapes = [("tinystories15m", 128, 256, []), ("llama110m", 32, 1024, LLAMA_110M)]
        report["throughput"] = [throughput(args, *shape) for shape in shapes]
    if "train" not in args.skip:  # before `parallel`, which then finds the prepared shards in the cache
        report["train"] = train_run(args)
    if "parallel" not in args.skip:
        report["parallel"] = {mode: parallel(args, mode, env["gpus"]) for mode in ("ddp", "fsdp")}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report)
    (args.out / "gpu_check.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
