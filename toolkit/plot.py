"""What a run's metrics look like: curves from run folders' metrics.jsonl (loss, train and val, against tokens;
lr; tokens/s; any metric a family logs; several runs overlay with a legend, a run still training is drawn as far
as it got), and TensorBoard event files (tensorboardX). metrics.jsonl stays the source of truth."""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.errors import UserError
from toolkit.fsio import atomic_write

BASE_PANELS = ("loss", "lr", "tokens_per_s")


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl; a half-written last line (a run being written) is skipped."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl (is it a run folder from `lmkit train`?)")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break  # the trainer is writing it
            raise UserError(f"{path}:{n}: not valid JSON") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(tokens, values) of `key` over the records that have it; the tokens of an eval record are its step's."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and r.get("step") in tokens_at:
            xs.append(tokens_at[r["step"]])
            ys.append(float(value))
    return xs, ys


def plot_runs(runs: list[str | Path], out: str | Path | None = None, metrics: list[str] = (), log_x: bool = False,
              labels: list[str] | None = None):
    """One figure, a panel per quantity (loss, lr, tokens/s, then each of `metrics`); returns the figure and writes
    it as a PNG to `out` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_records = [read_metrics(r) for r in runs]
    labels = labels or [Path(r).name or str(r) for r in runs]
    for name in metrics:
        if not any(series(recs, name)[0] for recs in all_records):
            raise UserError(f"--metric {name}: no run logged it (metrics.jsonl keys: "
                            f"{', '.join(sorted({k for recs in all_records for r in recs for k in r}))})")
    panels = [*BASE_PANELS, *metrics]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), dpi=100, sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for recs, label, color in zip(all_records, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
            if panel == "loss":
                x, y = series(recs, "loss")
                ax.plot(x, y, color=color, alpha=0.6, lw=1, label=f"{label} train")
                x, y = series(recs, "val_loss")
                ax.plot(x, y, color=color, marker="o", ms=3, lw=1.5, label=f"{label} val")
            else:
                x, y = series(recs, panel)
                ax.plot(x, y, color=color, lw=1, label=label)
        ax.set_ylabel({"loss": "loss (nats)", "lr": "learning rate", "tokens_per_s": "tokens/s"}.get(panel, panel))
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("training tokens")
    fig.tight_layout()
    if out is not None:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return fig


def to_tensorboard(run: str | Path, log_dir: str | Path | None = None) -> Path:
    """Write an existing run's metrics.jsonl (and samples.jsonl) as TensorBoard event files."""
    run = Path(run)
    board = TensorBoard(Path(log_dir or run / "tensorboard"))
    for record in read_metrics(run):
        board.scalars(record)
    samples = run / "samples.jsonl"
    if samples.is_file():
        for line in samples.read_text(encoding="utf-8").splitlines():
            if line.strip():
                board.sample(json.loads(line))
    board.close()
    return board.log_dir


class TensorBoard:
    """Scalars and samples as TensorBoard event files, through tensorboardX (no TensorFlow)."""

    def __init__(self, log_dir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("TensorBoard logging needs tensorboardX: pip install 'lmkit[tensorboard]' "
                            "(or pip install tensorboardX)") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def scalars(self, record: dict) -> None:
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def sample(self, sample: dict) -> None:
        self.writer.add_text(f"sample/{sample['prompt'][:40]}", sample["text"], sample["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
