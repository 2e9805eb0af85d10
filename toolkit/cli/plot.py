"""`lmkit plot RUN [RUN ...] -o curves.png`: training curves of one or several runs; `--tensorboard` writes event
files instead."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.console import info
from toolkit.errors import UserError


def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (a run still training is drawn as far as it got)."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="The PNG to write."),
    metric: list[str] = typer.Option([], "--metric", "-m", help="Also plot this metrics.jsonl key (repeatable), "
                                     "e.g. val_bpb or a family's own term."),
    log_x: bool = typer.Option(False, "--log-x", help="Logarithmic token axis."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Write each run's metrics.jsonl (and samples) as "
                                     "TensorBoard event files under RUN/tensorboard/ instead of a PNG."),
):
    """Train and val loss against training tokens, the learning rate, tokens/s and any --metric; several runs
    overlay with a legend."""
    from toolkit import plot as plot_lib

    if tensorboard:
        for run in runs:
            info(f"wrote {plot_lib.to_tensorboard(run)} (tensorboard --logdir {run / 'tensorboard'})")
        return
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: expected a .png file")
    plot_lib.plot_runs(runs, out, metric, log_x)
    info(f"wrote {out}")
