"""A/B comparison over seeds: is a difference between two recipes (or two sets of runs) real?

`train_arm` trains (or reuses, or resumes) one run per seed, `compare_runs` evaluates every run on the same
val windows (toolkit.evaluate.evaluate_run) and writes the report: per-arm mean ± t interval, the B − A
difference (paired by seed when the seeds match, Welch otherwise), a verdict, and val-loss curves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (nan with fewer than 2 values)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan
    se = float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * se


def difference_test(a, b, paired: bool, confidence: float = 0.95) -> dict:
    """B - A: the mean difference, its CI half-width, t, degrees of freedom and two-sided p-value.
    Paired over matching seeds (a t-test on the differences), else Welch's unequal-variance t-test."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if paired:
        if len(a) != len(b):
            raise ValueError("a paired test needs as many values in each arm")
        d = b - a
        diff = float(d.mean())
        n = len(d)
        df = n - 1
        se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    else:
        diff = float(b.mean() - a.mean())
        if len(a) < 2 or len(b) < 2:
            se, df = math.nan, 0
        else:
            va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
            se = float(math.sqrt(va + vb))
            df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))) if va + vb > 0 else len(a) + len(b) - 2
    if not df or math.isnan(se):
        return {"test": "paired t" if paired else "Welch t", "diff": diff, "ci": math.nan, "t": math.nan,
                "df": df, "p": math.nan, "confidence": confidence}
    if se == 0:
        t, p = (math.copysign(math.inf, diff), 0.0) if diff else (0.0, 1.0)
    else:
        t = diff / se
        p = float(2 * stats.t.sf(abs(t), df))
    ci = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return {"test": "paired t" if paired else "Welch t", "diff": diff, "ci": ci, "t": float(t), "df": df, "p": p,
            "confidence": confidence}


def verdict(test: dict, name_a: str = "A", name_b: str = "B", alpha: float = 0.05) -> str:
    """One line: is the difference in val loss (B - A, nats) larger than seed noise?"""
    diff, ci, p = test["diff"], test["ci"], test["p"]
    if math.isnan(p):
        return f"{name_b} - {name_a} = {diff:+.4f} nats; too few seeds for a confidence interval"
    if p >= alpha:
        return f"difference within seed noise ({diff:+.4f} ± {ci:.4f} nats, p = {p:.3g})"
    better, worse = (name_b, name_a) if diff < 0 else (name_a, name_b)
    return f"{better} better than {worse} by {abs(diff):.4f} ± {ci:.4f} nats (p = {p:.3g})"


@dataclass
class RunResult:
    path: str
    recipe: str
    seed: int
    params: int
    flops_per_token: float
    val_sha256: str
    loss: float  # on the shared val windows
    curve: list = field(default_factory=list)  # [(tokens seen, val loss)] from metrics.jsonl
    bpb: float | None = None  # bits per byte on the same windows (None: the tokenizer has no byte lengths)


def check_same_val(runs: list[RunResult]) -> None:
    from toolkit.errors import UserError

    first = runs[0]
    for r in runs[1:]:
        if r.val_sha256 != first.val_sha256:
            raise UserError(f"runs were evaluated on different val data: {first.path} (val_sha256 "
                            f"{first.val_sha256}) vs {r.path} ({r.val_sha256}); compare needs the same data and "
                            "tokenizer for every run")


def read_run_info(path) -> dict:
    from pathlib import Path

    from toolkit import run as run_lib
    from toolkit.errors import UserError

    path = Path(path)
    if not run_lib.is_run(path):
        raise UserError(f"{path} is not a run folder (needs {run_lib.WEIGHTS} and {run_lib.RECIPE})")
    info_file = path / run_lib.RUN_INFO
    if not info_file.is_file():
        raise UserError(f"{path}: no {run_lib.RUN_INFO}; compare needs runs made by `lmkit train`")
    import json

    return json.loads(info_file.read_text())


def run_curve(path) -> list[tuple[int, float]]:
    import json
    from pathlib import Path

    info = read_run_info(path)
    per_step = info.get("tokens_per_step", 1)
    out = []
    for line in (Path(path) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line) if line.strip() else {}
        if "val_loss" in m:
            out.append((m["step"] * per_step, m["val_loss"]))
    return out


def score_run(path, device, max_batches: int, batch_size: int) -> RunResult:
    """A run's loss and bits per byte on the first `max_batches` x `batch_size` val windows of its shards."""
    from toolkit.evaluate import evaluate_run
    from toolkit.run import load_run

    info = read_run_info(path)
    r = load_run(path, device)
    res = evaluate_run(r, device, max_batches, batch_size)
    return RunResult(path=str(path), recipe=info.get("recipe", r.recipe.name), seed=r.recipe.train.seed,
                     params=r.model.num_params(), flops_per_token=float(r.model.flops_per_token(
                         r.recipe.model.max_seq_len)),
                     val_sha256=info.get("data", {}).get("val_sha256", ""), loss=res.loss, curve=run_curve(path),
                     bpb=res.bpb)


def summarize(name_a: str, runs_a: list[RunResult], name_b: str, runs_b: list[RunResult],
              confidence: float = 0.95) -> dict:
    """Per-arm mean ± CI, the B - A difference (paired by seed when the seeds match) and the verdict."""
    check_same_val(runs_a + runs_b)
    arms = {}
    for name, runs in ((name_a, runs_a), (name_b, runs_b)):
        mean, ci = t_interval([r.loss for r in runs], confidence)
        arms[name] = {"runs": [asdict(r) for r in runs], "n": len(runs), "seeds": [r.seed for r in runs],
                      "params": sorted({r.params for r in runs}), "flops_per_token": sorted({r.flops_per_token
                                                                                              for r in runs}),
                      "val_loss_mean": mean, "val_loss_ci": ci, "val_ppl_mean": math.exp(min(mean, 50.0))}
        bpbs = [r.bpb for r in runs]
        if bpbs and all(b is not None for b in bpbs):
            arms[name]["val_bpb_mean"], arms[name]["val_bpb_ci"] = t_interval(bpbs, confidence)
    seeds_a, seeds_b = [r.seed for r in runs_a], [r.seed for r in runs_b]
    paired = len(runs_a) > 1 and sorted(seeds_a) == sorted(seeds_b) and len(set(seeds_a)) == len(seeds_a)
    by_seed_b = {r.seed: r.loss for r in runs_b}
    a = [r.loss for r in sorted(runs_a, key=lambda r: r.seed)]
    b = [by_seed_b[r.seed] for r in sorted(runs_a, key=lambda r: r.seed)] if paired else [r.loss for r in runs_b]
    test = difference_test(a, b, paired, confidence)
    return {"a": name_a, "b": name_b, "arms": arms, "difference": test, "verdict": verdict(test, name_a, name_b),
            "val_sha256": runs_a[0].val_sha256}


def mean_curve(runs: list[RunResult], confidence: float = 0.95):
    """Tokens, mean val loss and CI half-width over the eval points that every run of an arm has."""
    common = sorted(set.intersection(*(set(t for t, _ in r.curve) for r in runs))) if runs else []
    means, cis = [], []
    for t in common:
        m, ci = t_interval([dict(r.curve)[t] for r in runs], confidence)
        means.append(m)
        cis.append(0.0 if math.isnan(ci) else ci)
    return np.array(common), np.array(means), np.array(cis)


def plot_curves(summary: dict, arms_runs: dict[str, list[RunResult]], path, title: str = "") -> None:
    """Val loss against training tokens: per arm, the mean over seeds and its 95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    plotted = 0
    for name, runs in arms_runs.items():
        x, m, ci = mean_curve(runs)
        if not len(x):
            continue
        ax.plot(x, m, marker="o", ms=3, label=f"{name} (n={len(runs)})")
        ax.fill_between(x, m - ci, m + ci, alpha=0.25)
        plotted += 1
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss (nats)")
    ax.set_title(title or f"{summary['a']} vs {summary['b']}: mean ± 95% CI over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:  # runs trained without evals (train.eval_interval past the end): no curve to draw
        ax.text(0.5, 0.5, "no val evals during training in these runs", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt_ci(mean: float, ci: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")


SUMMARY_COLUMNS = ("arm", "runs (seeds)", "parameters", "FLOPs/token", "val loss (nats), mean ± 95% CI",
                   "val bits/byte, mean ± 95% CI", "val ppl")


def summary_rows(summary: dict) -> list[tuple[str, ...]]:
    """One row per arm, in SUMMARY_COLUMNS order: the markdown report and the terminal table both print these."""
    rows = []
    for name, arm in summary["arms"].items():
        bpb = _fmt_ci(arm["val_bpb_mean"], arm["val_bpb_ci"]) if "val_bpb_mean" in arm else "-"
        rows.append((name, f"{arm['n']} ({', '.join(str(s) for s in arm['seeds'])})",
                     ", ".join(f"{p / 1e6:.3f} M" for p in arm["params"]),
                     ", ".join(f"{f / 1e6:.2f} M" for f in arm["flops_per_token"]),
                     _fmt_ci(arm["val_loss_mean"], arm["val_loss_ci"]), bpb, f"{arm['val_ppl_mean']:.2f}"))
    return rows


def difference_line(summary: dict) -> str:
    d = summary["difference"]
    p = "n/a" if math.isnan(d["p"]) else f"{d['p']:.3g}"
    return f"{summary['b']} − {summary['a']}: {_fmt_ci(d['diff'], d['ci'])} nats ({d['test']}, df = {d['df']:.3g}, p = {p})"


def markdown_report(summary: dict, command: str = "", png_name: str = "") -> str:
    a, b = summary["a"], summary["b"]
    lines = [f"# {a} vs {b}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(summary)]
    lines += ["", difference_line(summary), "", f"**Verdict:** {summary['verdict']}", ""]
    if png_name:
        lines += [f"![val loss curves]({png_name})", ""]
    return "\n".join(lines)


def budget_iters(recipe, budget_tokens: float) -> int:
    """Optimizer steps that see `budget_tokens` tokens (at least 1)."""
    per_step = recipe.train.batch_size * recipe.train.grad_accum * recipe.model.max_seq_len
    return max(1, math.ceil(budget_tokens / per_step))


def _same_setup(saved, wanted) -> bool:
    from dataclasses import replace

    def key(r):
        model = replace(r.model, vocab_size=0) if hasattr(r.model, "vocab_size") else r.model
        return model, r.train, r.data

    return key(saved) == key(wanted)


def train_arm(recipe_path, label: str, seeds: int, out_dir, overrides: list[str] = (),
              budget_tokens: float = 0.0) -> list:
    """Train (or reuse, or resume) `<out_dir>/<label>_s<seed>` for seeds 0..seeds-1: the same recipe, the same
    token budget, `train.seed` = the seed (which also fixes the data order, so arms see the same batches)."""
    from pathlib import Path

    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib
    from toolkit.console import info
    from toolkit.errors import UserError
    from toolkit.train.loop import train

    paths = []
    base = recipe_lib.load(recipe_path, list(overrides))
    for seed in range(seeds):
        sets = list(overrides) + [f"train.seed={seed}"]
        if budget_tokens:
            sets.append(f"train.max_iters={budget_iters(base, budget_tokens)}")
        r = recipe_lib.load(recipe_path, sets)
        run = Path(out_dir) / f"{label}_s{seed}"
        if run_lib.is_run(run) and (run / run_lib.STATE).is_file():
            saved = recipe_lib.load(run / run_lib.RECIPE)
            if not _same_setup(saved, r):
                raise UserError(f"{run} holds a run of a different recipe or settings; remove it or use another --out")
            step = run_lib.load_state(run / run_lib.STATE)["step"]
            if step >= r.train.max_iters:
                info(f"{run}: done (step {step}), reused")
            else:
                info(f"{run}: resuming at step {step}")
                train(r, run, resume=True)
        else:
            train(r, run, force=run.exists())
        paths.append(run)
    return paths


def compare_runs(name_a: str, paths_a: list, name_b: str, paths_b: list, out_dir, device="cpu",
                 max_batches: int = 0, batch_size: int = 0, command: str = "") -> tuple[dict, dict]:
    """Evaluate every run on the same val windows, write <out>/<a>_vs_<b>.{json,md,png}; (summary, files)."""
    import json
    from pathlib import Path

    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib
    from toolkit.errors import UserError

    if not paths_a or not paths_b:
        raise UserError("compare needs at least one run in each arm")
    infos = [read_run_info(p) for p in [*paths_a, *paths_b]]  # refuse different val data before evaluating
    hashes = {i.get("data", {}).get("val_sha256", "") for i in infos}
    if len(hashes) > 1:
        check_same_val([RunResult(str(p), "", 0, 0, 0.0, i.get("data", {}).get("val_sha256", ""), 0.0)
                        for p, i in zip([*paths_a, *paths_b], infos)])
    first = recipe_lib.load(Path(paths_a[0]) / run_lib.RECIPE)
    max_batches = max_batches or first.eval.max_batches
    batch_size = batch_size or first.eval.batch_size or first.train.batch_size
    runs_a = [score_run(p, device, max_batches, batch_size) for p in paths_a]
    runs_b = [score_run(p, device, max_batches, batch_size) for p in paths_b]
    summary = summarize(name_a, runs_a, name_b, runs_b)
    summary["eval"] = {"max_batches": max_batches, "batch_size": batch_size}
    summary["command"] = command
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name_a}_vs_{name_b}"
    files = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    plot_curves(summary, {name_a: runs_a, name_b: runs_b}, files["png"])
    files["json"].write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    files["md"].write_text(markdown_report(summary, command, files["png"].name))
    return summary, files


def _json_safe(obj):
    """NaN/inf (an undefined CI) -> null, so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def plot_run_folders(arms: dict[str, list], path, title: str = "val loss: mean ± 95% CI over seeds") -> None:
    """One plot of any number of arms from their run folders' metrics.jsonl (no evaluation)."""
    runs = {name: [RunResult(str(p), name, 0, 0, 0.0, "", 0.0, run_curve(p)) for p in paths]
            for name, paths in arms.items()}
    plot_curves({"a": "", "b": ""}, runs, path, title)
