"""Where the time of one training step goes: forward, backward, clipping, optimizer (wall time of each phase),
and the operators grouped into matmuls, attention, cross-entropy over the vocabulary, optimizer kernels, memory
(allocation, copies, fills) and the rest (self CPU time from torch.profiler). Prints JSON.

    python benchmarks/train_profile.py recipes/tinystories15m.toml --batch 16 --dtype bfloat16

Eager mode (the profiler attributes a compiled graph to one opaque call); random tokens, the recipe's optimizer
groups and clipping, the trainer's own clipping function. `page_faults_per_step` counts fresh memory asked of
the system (the allocator's share of the step).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import models  # noqa: E402
from toolkit import recipe as recipe_lib  # noqa: E402
from toolkit.device import autocast, keep_freed_memory, resolve_device, resolve_dtype  # noqa: E402
from toolkit.train.loop import clip_gradients  # noqa: E402
from toolkit.train.optim import build_optimizers  # noqa: E402

# operator name fragments -> category, first match wins
CATEGORIES = [
    ("cross_entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax_backward_data")),
    ("optimizer", ("_fused_adam", "_foreach_", "adam", "muon", "lerp", "addcdiv")),
    ("matmul", ("mm", "matmul", "linear", "baddbmm", "addbmm", "mkldnn", "onednn")),
    ("memory", ("empty", "copy_", "to_copy", "zero_", "fill_", "clone", "contiguous", "cat", "stack")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return cat
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=0, help="0 = the model's max_seq_len")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=0, help="vocab size when the recipe leaves it to the tokenizer")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="operators listed by self time")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    r = recipe_lib.load(args.recipe, args.overrides)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    vocab = getattr(r.model, "vocab_size", 0) or args.vocab or r.tokenizer.vocab_size
    torch.manual_seed(0)
    model = models.build(r.model, vocab).to(device)
    seq = args.seq or r.model.max_seq_len
    optimizers = build_optimizers(model, r.train, device.type)
    amp = autocast(device, dtype)
    phases = defaultdict(float)

    def step(timed: bool):
        x = torch.randint(0, vocab, (args.batch, seq), device=device)
        y = torch.randint(0, vocab, (args.batch, seq), device=device)
        marks = [time.perf_counter()]
        with amp:
            _, loss = model(x, y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if r.train.grad_clip:
            clip_gradients(model, optimizers, r.train.grad_clip)
        marks.append(time.perf_counter())
        for opt in optimizers:
            opt.step()
            opt.__dict__.pop("grad_scale", None)
            opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if timed:
            for name, a, b in zip(("forward", "backward", "clip", "optimizer"), marks, marks[1:]):
                phases[name] += (b - a) / args.steps

    for _ in range(args.warmup):
        step(False)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):  # phases first, without the profiler's own overhead
        step(True)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(False)
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    by_cat = defaultdict(float)
    for e in ops:
        by_cat[category(e.key)] += e.self_cpu_time_total
    step_ms = 1000 * sum(phases.values())
    print(json.dumps({
        "recipe": r.name, "params": model.num_params(), "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
        "seq": seq, "threads": torch.get_num_threads(), "ms_per_step": round(step_ms, 1),
        "tokens_per_s": round(args.batch * seq / (step_ms / 1000), 1),
        "phases_ms": {k: round(1000 * v, 1) for k, v in phases.items()},
        "operator_share": {k: round(v / total, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_operators": [{"op": e.key, "category": category(e.key), "share": round(e.self_cpu_time_total / total, 3),
                           "calls_per_step": e.count // args.steps} for e in
                          sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]],
        "page_faults_per_step": round(faults),
    }))


if __name__ == "__main__":
    main()
