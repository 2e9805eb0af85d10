"""A seed's own result files, written from an lmkit run, so a user can hold the run against the seed's with the
seed's own scripts. `boggers`: BoggersTheLLM's epoch metrics CSV (`--epoch-metrics-csv`) and eval results JSON
(`--eval-results-json`), same column names and meanings.

An "epoch" is the seed's: one pass over its training windows, which slide one token at a time, so an epoch of
this corpus is (train tokens - window) windows, that many / (batch x grad_accum) optimizer steps. Rows come
from metrics.jsonl: each epoch's mean of the logged losses and training terms, the val CE of the last eval inside
it, and the lr and step at its end. Columns lmkit has no equivalent for (TSCore) are left empty, as the seed
leaves a value it did not compute.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from toolkit.errors import UserError
from toolkit.fsio import atomic_write_json, atomic_write_text

BOGGERS_COLUMNS = ["epoch", "loss_mode", "mean_loss", "train_ce", "val_ce", "train_traj_contrast", "val_traj_contrast",
                   "mean_final_step_tension", "max_batch_loss", "lr", "global_step", "tscore_evolves",
                   "tscore_last_tension"]
FORMATS = ("boggers",)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _fmt(value, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def boggers_rows(records: list[dict], steps_per_epoch: int, loss_mode: str) -> list[list[str]]:
    """One CSV row per (whole or begun) epoch of the logged steps."""
    last_step = max((r["step"] for r in records), default=0)
    rows = []
    for epoch in range(1, math.ceil(last_step / steps_per_epoch) + 1):
        lo, hi = (epoch - 1) * steps_per_epoch, epoch * steps_per_epoch
        train = [r for r in records if lo < r["step"] <= hi and "loss" in r]
        evals = [r for r in records if lo < r["step"] <= hi and "val_loss" in r]
        if not train:
            continue
        rows.append([
            str(epoch), loss_mode, _fmt(_mean([r["loss"] for r in train])),
            _fmt(_mean([r.get("train_ce") for r in train])), _fmt(evals[-1]["val_loss"] if evals else None),
            _fmt(_mean([r.get("traj_contrast") for r in train])),
            _fmt(evals[-1].get("val_traj_contrast") if evals else None),
            _fmt(_mean([r.get("final_tension") for r in train])),
            _fmt(max(r["loss"] for r in train)),  # of the logged (per log interval) losses
            _fmt(train[-1]["lr"], 8), str(train[-1]["step"]), "", "",
        ])
    return rows


def write_boggers(run, out_dir: Path, device="cpu") -> dict[str, Path]:
    """epoch_metrics.csv and eval_results.json of a run (a loaded toolkit.run.Run) into `out_dir`."""
    from toolkit.evaluate import evaluate_run
    from toolkit.plot import read_metrics

    rc = run.recipe
    info = run.info
    window = getattr(rc.model, "window", 0)
    if not window:
        raise UserError(f"{run.path}: the boggers format is BoggersTheLLM's (the attractor family); this is a "
                        f"{rc.model.family} run")
    train_tokens = int(info.get("data", {}).get("train_tokens", 0))
    windows = max(1, train_tokens - window)
    steps_per_epoch = max(1, math.ceil(windows / (rc.train.batch_size * rc.train.grad_accum)))
    records = read_metrics(run.path)
    out_dir = Path(out_dir)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(BOGGERS_COLUMNS)
    writer.writerows(boggers_rows(records, steps_per_epoch, rc.model.loss))
    files = {"csv": out_dir / "epoch_metrics.csv", "json": out_dir / "eval_results.json"}
    atomic_write_text(files["csv"], text.getvalue())
    res = evaluate_run(run, device)
    atomic_write_json(files["json"], {
        "base": {"val_ce": res.loss, "val_ppl": res.ppl, "val_traj_contrast": res.extras.get("val_traj_contrast"),
                 "val_windows": res.windows, "val_metrics_reliable": res.windows >= 50},  # the seed's MIN_VAL_WINDOWS
        "checkpoint": str(run.path / "model.safetensors"),
        "config": {"dataset_source": rc.data.source, "corpus_path": info.get("data", {}).get("corpus"),
                   "stream_source_path": info.get("data", {}).get("corpus"), "tokenizer": rc.tokenizer.encoding,
                   "vocab_cap": rc.tokenizer.vocab_cap, "window_size": window,
                   "max_epochs": round(run.step / steps_per_epoch, 3), "val_fraction": rc.data.val_fraction,
                   "loss_mode": rc.model.loss, "use_goat_memory": False, "use_substrate": False,
                   "seed": rc.train.seed},
        "lmkit": {"run": str(run.path), "step": run.step, "steps_per_epoch": steps_per_epoch,
                  "windows_per_epoch": windows, "epoch": "one pass over (train tokens - window) sliding windows",
                  "seed_val_ce": res.extras.get("seed_val_ce")},
    })
    return files


def write(fmt: str, run, out_dir: Path, device="cpu") -> dict[str, Path]:
    if fmt not in FORMATS:
        raise UserError(f"--seed-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return write_boggers(run, out_dir, device)
