"""Quality per wall-clock budget: train a recipe for M minutes on a data source, print final val loss and
bits per byte as JSON.

    python benchmarks/quality_budget.py recipes/tinystories15m.toml --data path/to/tinystories --minutes 10 \\
        --set train.batch_size=16 --set train.grad_accum=1

max_iters is set from a short throughput calibration so that the schedule ends near the budget
(the run also stops at the budget whatever happens); the final eval is on the fixed val windows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import console, models  # noqa: E402
from toolkit import recipe as recipe_lib
from toolkit import run as run_lib  # noqa: E402
from toolkit.device import autocast, resolve_device, resolve_dtype  # noqa: E402
from toolkit.evaluate import evaluate  # noqa: E402
from toolkit.shards.format import ShardSet  # noqa: E402
from toolkit.train.loop import train, train_step  # noqa: E402
from toolkit.train.optim import build_optimizers  # noqa: E402


def seconds_per_step(r, vocab: int) -> float:
    device = resolve_device(r.train.device)
    model = models.build(r.model, vocab).to(device)
    opts = build_optimizers(model, r.train, device.type)
    amp = autocast(device, resolve_dtype(r.train.dtype, device))
    T = r.model.max_seq_len
    batches = [(torch.randint(0, vocab, (r.train.batch_size, T)), torch.randint(0, vocab, (r.train.batch_size, T)))
               for _ in range(r.train.grad_accum)]
    for _ in range(2):
        train_step(model, model, opts, batches, amp, r.train.grad_clip).item()
    t0 = time.perf_counter()
    for _ in range(3):
        train_step(model, model, opts, batches, amp, r.train.grad_clip).item()
    return (time.perf_counter() - t0) / 3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--data", required=True, help="any `lmkit data` source")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--separator", default="blank-line", help="how .txt files split into documents")
    ap.add_argument("--out", default="", help="run folder (default: a temporary one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    budget = args.minutes * 60
    overrides = [f"data.source={args.data}", f"data.separator={args.separator}"] + args.overrides
    r = recipe_lib.load(args.recipe, overrides)
    out = Path(args.out or tempfile.mkdtemp(prefix="quality_budget_"))

    from toolkit.shards.prepare import prepare

    t_prep = time.perf_counter()
    prepared = prepare(r)
    prep_s = time.perf_counter() - t_prep
    vocab = prepared.tokenizer.vocab_size
    sps = seconds_per_step(r, vocab)
    evals = 4
    eval_s = sps * r.train.eval_iters / r.train.grad_accum / 3  # forward only, one micro-batch per eval batch
    steps = max(1, int((budget - evals * eval_s) / sps))
    r = recipe_lib.load(args.recipe, overrides + [f"train.max_iters={steps}",
                                                  f"train.eval_interval={max(1, steps // evals)}",
                                                  f"train.warmup_iters={min(r.train.warmup_iters, steps // 10)}"])
    t0 = time.perf_counter()
    summary = train(r, out, force=True, time_limit=budget)
    wall = time.perf_counter() - t0
    run = run_lib.load_run(out, resolve_device(r.train.device))
    dev = next(run.model.parameters()).device
    res = evaluate(run.model, ShardSet(prepared.shards), "val", r.model.max_seq_len, r.train.batch_size, 10**9, dev,
                   autocast(dev, resolve_dtype(r.train.dtype, dev)), prepared.tokenizer.token_bytes())
    print(json.dumps({
        "recipe": r.name, "data": args.data, "minutes": args.minutes, "params": summary["params"],
        "steps": run.step, "planned_steps": steps, "tokens": run.step * r.train.batch_size * r.train.grad_accum *
        r.model.max_seq_len, "train_wall_s": round(wall, 1), "prepare_s": round(prep_s, 1),
        "val_loss": round(res.loss, 4), "val_ppl": round(res.ppl, 3), "val_bpb": round(res.bpb, 4),
        "val_tokens": res.tokens, "vocab_size": vocab, "dtype": str(resolve_dtype(r.train.dtype, dev)), "run": str(out),
    }))


if __name__ == "__main__":
    console.set_quiet(True)
    main()
