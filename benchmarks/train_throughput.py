"""Training throughput of a recipe's model through the trainer's own step. Prints JSON.

    python benchmarks/train_throughput.py recipes/tinystories15m.toml --batch 16 --seq 256 --dtype bfloat16 --compile

Random tokens (no data needed), the recipe's optimizer groups, clipping and precision; MFU is
against the peak of the precision used (measured on CPU, known for GPUs; --peak-flops overrides).
Model settings go through --set (e.g. --set model.steps=16 --set model.vectorized=false).

--repeats R times R blocks of --steps steps: the figures are the median block, `best_ms_per_step` the
fastest; `cpu_ms_per_step` is the process CPU time per step (robust to other load when one thread runs),
`page_faults_per_step` the minor page faults (fresh memory the allocator asked the system for).
`scored_tokens_per_s` counts the positions the loss scores (a model's `scored_tokens(seq_len)` per row,
e.g. 1 for the attractor A1 recipe's `train_positions = 1`), `tokens_per_s` the batch x seq it reads.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import models  # noqa: E402
from toolkit import recipe as recipe_lib
from toolkit.device import autocast, keep_freed_memory, peak_flops, resolve_device, resolve_dtype  # noqa: E402
from toolkit.train.loop import train_step  # noqa: E402
from toolkit.train.optim import build_optimizers  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=0, help="0 = the model's max_seq_len")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--vocab", type=int, default=0, help="vocab size when the recipe leaves it to the tokenizer")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="timed blocks of --steps steps (median reported)")
    ap.add_argument("--peak-flops", type=float, default=0.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    r = recipe_lib.load(args.recipe, args.overrides)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    vocab = getattr(r.model, "vocab_size", 0) or args.vocab or r.tokenizer.vocab_size
    torch.manual_seed(0)
    raw = models.build(r.model, vocab).to(device)
    seq = args.seq or r.model.max_seq_len
    optimizers = build_optimizers(raw, r.train, device.type)
    model = torch.compile(raw) if args.compile else raw
    amp = autocast(device, dtype)
    # a fresh random batch every step: a batch seen again and again gets memorised, which changes the work of
    # some models (the attractor's extra noise on sharp distributions, how often clipping fires)
    steps = [[(torch.randint(0, vocab, (args.batch, seq), device=device),
               torch.randint(0, vocab, (args.batch, seq), device=device)) for _ in range(args.accum)]
             for _ in range(args.warmup + args.steps * args.repeats)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = train_step(model, raw, optimizers, steps[i], amp, r.train.grad_clip)
    loss.item()
    sync()
    warmup_s = time.perf_counter() - t0
    walls, cpus, faults = [], [], []
    for rep in range(args.repeats):
        t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(args.steps):
            loss = train_step(model, raw, optimizers, steps[args.warmup + rep * args.steps + i], amp,
                              r.train.grad_clip)
        loss.item()
        sync()
        walls.append((time.perf_counter() - t0) / args.steps)
        cpus.append((time.process_time() - c0) / args.steps)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps)
    dt, cpu = sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]
    tokens = args.batch * seq * args.accum
    scored = args.batch * args.accum * (raw.scored_tokens(seq) if hasattr(raw, "scored_tokens") else seq)
    tps = tokens / dt
    peak = peak_flops(device, dtype, args.peak_flops)
    fpt = raw.flops_per_token(seq)
    print(json.dumps({
        "recipe": r.name, "family": r.model.family, "params": raw.num_params(), "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "compile": args.compile, "batch": args.batch, "seq": seq,
        "accum": args.accum, "tokens_per_s": round(tps, 1), "scored_tokens_per_s": round(scored / dt, 1),
        "ms_per_step": round(1000 * dt, 1), "best_ms_per_step": round(1000 * min(walls), 1),
        "cpu_ms_per_step": round(1000 * cpu, 1), "best_cpu_ms_per_step": round(1000 * min(cpus), 1),
        "page_faults_per_step": round(sorted(faults)[len(faults) // 2]),
        "mfu": round(tps * fpt / peak, 4) if peak else None, "peak_flops": peak, "flops_per_token": fpt,
        "warmup_s": round(warmup_s, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
