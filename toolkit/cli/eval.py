"""`lmkit eval RUN` (val loss, perplexity, bits per byte) and `lmkit eval compare` (A/B over seeds).

`eval` is a group whose default subcommand is `run`, so `lmkit eval RUN [options]` keeps working.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from toolkit.cli.groups import DefaultCommandGroup
from toolkit.console import console
from toolkit.errors import UserError


class EvalGroup(DefaultCommandGroup):
    """`lmkit eval RUN` means `lmkit eval run RUN`, options first or not (`lmkit eval --json RUN`)."""

    default = "run"
    options_to_default = True


app = typer.Typer(
    cls=EvalGroup,
    no_args_is_help=True,
    help="Evaluate a run (`lmkit eval RUN`), or compare two recipes or two sets of runs over seeds "
    "(`lmkit eval compare A B`).",
)


@app.command("run")
def eval_run(
    run: Path = typer.Argument(..., help="A run folder from `lmkit train`."),
    data: str = typer.Option(None, "--data", help="Evaluate on this text instead of the run's val shards: a .txt/.md/"
                             ".jsonl file, a folder, or a corpus folder from `lmkit data` (its val split)."),
    batches: int = typer.Option(0, help="Number of val batches (0 = the recipe's eval.max_batches)."),
    batch_size: int = typer.Option(0, help="Sequences per batch (0 = the recipe's)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    seed_format: str = typer.Option(None, "--seed-format", help="Also write a seed's own result files: boggers "
                                    "(BoggersTheLLM's epoch metrics CSV and eval results JSON)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the --seed-format files."),
):
    """Token-level cross-entropy, perplexity and bits per byte on fixed val windows (the same for every run)."""
    from toolkit import run as run_lib
    from toolkit.device import resolve_device
    from toolkit.evaluate import evaluate_run

    dev = resolve_device(device)
    r = run_lib.load_run(run, dev)
    if seed_format:
        from toolkit import seed_formats

        if out is None:
            raise UserError("--seed-format needs --out DIR for its files")
        files = seed_formats.write(seed_format, r, out, dev)
        console.print(f"wrote {', '.join(str(p) for p in files.values())}")
        return
    res = evaluate_run(r, dev, batches, batch_size, data)
    source = data or "val shards"
    out = {"run": str(run), "step": r.step, "data": source, **res.to_dict()}
    if as_json:
        print(json.dumps(out))
        return
    table = Table(title=f"{run} (step {r.step}) on {source}")
    for col in ("val loss (nats)", "perplexity", "bits per byte", "tokens", "windows"):
        table.add_column(col, justify="right")
    for name in res.extras:
        table.add_column(name, justify="right")
    table.add_row(f"{res.loss:.4f}", f"{res.ppl:.2f}", f"{res.bpb:.4f}" if res.bpb else "-", f"{res.tokens:,}",
                  str(res.windows), *(f"{v:.4f}" for v in res.extras.values()))
    console.print(table)


SEPARATOR = "vs"


@app.command("compare")
def compare(
    items: list[str] = typer.Argument(..., help="Two recipes (A B), or run folders of arm A, the word 'vs', then run "
                                      "folders of arm B. Runs without 'vs' are split by the recipe name in run.json."),
    seeds: int = typer.Option(3, "--seeds", help="Recipes: seeds 0..N-1 per arm (train.seed)."),
    budget_tokens: float = typer.Option(0.0, "--budget-tokens", help="Recipes: training tokens per run, the same "
                                        "for both arms (sets train.max_iters); 0 = each recipe's max_iters."),
    out: Path = typer.Option(Path("out/compare"), "--out", "-o", help="Runs (<label>_s<seed>) and the report go here."),
    overrides: list[str] = typer.Option([], "--set", help="table.key=value for both arms (e.g. data.source=...)."),
    set_a: list[str] = typer.Option([], "--set-a", help="table.key=value for arm A only."),
    set_b: list[str] = typer.Option([], "--set-b", help="table.key=value for arm B only."),
    label_a: str = typer.Option("", "--label-a", help="Name of arm A (default: its recipe name)."),
    label_b: str = typer.Option("", "--label-b", help="Name of arm B (default: its recipe name)."),
    batches: int = typer.Option(0, help="Val batches per run (0 = the first run's eval.max_batches)."),
    batch_size: int = typer.Option(0, help="Sequences per val batch (0 = the first run's)."),
    device: str = typer.Option("cpu", help="Evaluation device: auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary instead of a table."),
):
    """Is the difference between A and B real? Val loss mean ± 95% CI per arm over seeds, the B − A difference
    (paired by seed when the seeds match, Welch otherwise) with its p-value, and a one-line verdict; writes
    <out>/<A>_vs_<B>.json, .md and .png (val-loss curves, mean ± CI band)."""
    import shlex

    from toolkit import run as run_lib
    from toolkit.compare import compare_runs, train_arm
    from toolkit.device import resolve_device

    words = ["lmkit", "eval", "compare", *items, "--seeds", str(seeds), "--budget-tokens", f"{budget_tokens:g}",
             "--out", str(out)]
    for flag, values in (("--set", overrides), ("--set-a", set_a), ("--set-b", set_b)):
        for v in values:
            words += [flag, v]
    for flag, v in (("--label-a", label_a), ("--label-b", label_b), ("--batches", batches), ("--batch-size", batch_size)):
        if v:
            words += [flag, str(v)]
    command = " ".join(shlex.quote(w) for w in words)  # recorded in the report, to reproduce it
    if len(items) == 2 and not any(run_lib.is_run(Path(i)) for i in items) and SEPARATOR not in items:
        from toolkit import recipe as recipe_lib

        if seeds < 1:
            raise UserError("--seeds: expected at least 1")
        ra = recipe_lib.load(items[0], [*overrides, *set_a])
        rb = recipe_lib.load(items[1], [*overrides, *set_b])
        name_a, name_b = label_a or ra.name, label_b or rb.name
        if name_a == name_b:
            raise UserError(f"both arms are named {name_a!r}; name them with --label-a and --label-b")
        paths_a = train_arm(items[0], name_a, seeds, out, [*overrides, *set_a], budget_tokens)
        paths_b = train_arm(items[1], name_b, seeds, out, [*overrides, *set_b], budget_tokens)
    else:
        if overrides or set_a or set_b:
            raise UserError("--set, --set-a and --set-b apply to recipes; these are existing runs")
        name_a, paths_a, name_b, paths_b = split_runs(items)
        name_a, name_b = label_a or name_a, label_b or name_b
    summary, files = compare_runs(name_a, paths_a, name_b, paths_b, out, resolve_device(device), batches,
                                  batch_size, command)
    if as_json:
        print(files["json"].read_text())
        return
    print_summary(summary)
    console.print(f"wrote {files['json']}, {files['md']}, {files['png']}")


def split_runs(items: list[str]) -> tuple[str, list[Path], str, list[Path]]:
    """'A... vs B...', or runs of exactly two recipes (by the recipe name in each run.json)."""
    from toolkit.compare import read_run_info

    if SEPARATOR in items:
        i = items.index(SEPARATOR)
        a, b = [Path(p) for p in items[:i]], [Path(p) for p in items[i + 1 :]]
        if not a or not b or SEPARATOR in items[i + 1 :]:
            raise UserError("expected run folders of arm A, 'vs', then run folders of arm B")
        names = [read_run_info(a[0]).get("recipe", "A"), read_run_info(b[0]).get("recipe", "B")]
        if names[0] == names[1]:
            names = [f"{names[0]}_a", f"{names[1]}_b"]
        return names[0], a, names[1], b
    arms: dict[str, list[Path]] = {}
    for p in items:
        arms.setdefault(read_run_info(p).get("recipe", "?"), []).append(Path(p))
    if len(arms) != 2:
        found = ", ".join(arms) or "none"
        raise UserError(f"these runs come from {len(arms)} recipe(s) ({found}); give two recipes' runs, or split "
                        f"them yourself: lmkit eval compare RUN... {SEPARATOR} RUN...")
    (name_a, a), (name_b, b) = arms.items()
    return name_a, a, name_b, b


def print_summary(summary: dict) -> None:
    """The table and verdict go to stdout (they are the result); progress went to stderr."""
    import sys

    from rich.console import Console

    from toolkit.compare import SUMMARY_COLUMNS, difference_line, summary_rows

    out = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 120)  # no clipped names in pipes
    table = Table(title=f"{summary['a']} vs {summary['b']} (same val windows)")
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for row in summary_rows(summary):
        table.add_row(*row)
    out.print(table, markup=False)
    out.print(difference_line(summary), markup=False)
    out.print(f"verdict: {summary['verdict']}", markup=False)
