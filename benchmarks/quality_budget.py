"""Quality per wall-clock budget: train a recipe for M minutes (train.max_minutes: the lr schedule runs on the
fraction of the budget done, the final eval and checkpoint are inside it) over one or more seeds, then print the
val loss and bits per byte on the whole val split as JSON, with mean ± 95% t interval over the seeds.

    python benchmarks/quality_budget.py recipes/tinystories15m.toml --data path/to/tinystories --minutes 8 \\
        --seeds 3 --set train.batch_size=16 --set train.grad_accum=1 --set train.lr=1e-3

Runs one seed at a time (two at once on the same cores would halve each other's speed). To compare two recipes
on a machine whose speed drifts, alternate them a seed at a time (`--seeds 1 --first-seed K`, the same --out for a
recipe) and compare the folders with `lmkit eval compare`. Each run's
`budget_used_s` is the time it counted against the budget (steps, evals, checkpoints: state.pt's wall_s),
`train_wall_s` that and the data preparation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import console  # noqa: E402
from toolkit import recipe as recipe_lib  # noqa: E402
from toolkit.compare import t_interval  # noqa: E402
from toolkit.evaluate import evaluate_run  # noqa: E402
from toolkit.run import STATE, load_run, load_state  # noqa: E402
from toolkit.train.loop import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--data", required=True, help="any `lmkit data` source")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, default=1, help="train.seed = F .. F+N-1 (F: --first-seed), one run each")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="the first train.seed: run two recipes a seed at a time, alternating, into one --out each")
    ap.add_argument("--separator", default="blank-line", help="how .txt files split into documents")
    ap.add_argument("--evals", type=int, default=0, help="evals during training besides the final one (0 = none)")
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="quality_budget_"))
    base = [f"data.source={args.data}", f"data.separator={args.separator}", f"train.max_minutes={args.minutes}",
            "train.plot=false", *args.overrides]
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        r = recipe_lib.load(args.recipe, base + [f"train.seed={seed}"])
        if not args.evals:
            r = r.replace(train=dataclasses.replace(r.train, eval_interval=10**9))
        folder = out / f"seed{seed}"
        t0 = time.perf_counter()
        summary = train(r, folder, force=True)
        wall = time.perf_counter() - t0
        run = load_run(folder, r.train.device if r.train.device != "auto" else "cpu")
        res = evaluate_run(run, next(run.model.parameters()).device, batches=10**9)
        runs.append({"seed": seed, "steps": run.step, "tokens": run.step * r.train.batch_size * r.train.grad_accum *
                     r.model.max_seq_len, "train_wall_s": round(wall, 1),
                     "budget_used_s": round(load_state(folder / STATE)["wall_s"], 1), "val_loss": round(res.loss, 4),
                     "val_bpb": round(res.bpb, 4) if res.bpb else None, "val_tokens": res.tokens,
                     "params": summary["params"]})
    report = {"recipe": r.name, "data": args.data, "minutes": args.minutes, "seeds": args.seeds, "runs": runs,
              "folder": str(out)}
    for key in ("val_loss", "val_bpb", "steps"):
        values = [x[key] for x in runs if x[key] is not None]
        if values:
            mean, ci = t_interval(values)
            report[key] = {"mean": round(mean, 4), "ci95": None if ci != ci else round(ci, 4)}
    print(json.dumps(report))


if __name__ == "__main__":
    console.set_quiet(True)
    main()
