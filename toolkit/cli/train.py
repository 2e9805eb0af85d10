"""`lmkit train RECIPE` (or `lmkit train RUN --resume`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from toolkit.errors import UserError


def train(
    target: str = typer.Argument(..., help="A recipe (.toml path or shipped name), or a run folder with --resume."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set train.lr=3e-4 (repeatable)."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: train.out_dir or out/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in TARGET (or --out) from its checkpoint."),
    init_from: Path = typer.Option(None, "--init-from", help="Start from another run's weights and tokenizer "
                                   "(fine-tuning)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: train.device)."),
    force: bool = typer.Option(False, "--force", help="Start over in a run folder that already holds a run."),
    stop_after: int = typer.Option(0, "--stop-after", help="Stop after this many steps, with a checkpoint "
                                   "(continue later with --resume; for time-sliced jobs)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard event files under "
                                     "RUN/tensorboard/ (train.tensorboard = true; needs tensorboardX)."),
):
    """Train a model: makes whatever of data -> vocab -> pretokenize is missing or stale, then trains with
    checkpoints, evals and metrics.jsonl in the run folder. Under torchrun it trains with DDP (or FSDP2: train.parallel = "fsdp")."""
    from toolkit import recipe as recipe_lib
    from toolkit.train.loop import resume_recipe, run_dir_for
    from toolkit.train.loop import train as run_training

    overrides = list(set_) + ([f"train.device={device}"] if device else []) + \
        (["train.tensorboard=true"] if tensorboard else [])
    path = Path(target)
    if path.is_dir():
        if not resume:
            raise UserError(f"{path} is a run folder; add --resume to continue it (or give a recipe to start a new run)")
        recipe = resume_recipe(path, overrides)
        run_dir = path
    elif init_from is not None:
        from toolkit import run as run_lib

        if not run_lib.is_run(init_from):
            raise UserError(f"--init-from {init_from}: not a run folder (needs model.safetensors and recipe.toml)")
        base = recipe_lib.load(Path(init_from) / run_lib.RECIPE)
        recipe = recipe_lib.load_onto(target, overrides, base, f"the --init-from run {init_from}")
        run_dir = out or run_dir_for(recipe)
    else:
        recipe = recipe_lib.load(target, overrides)
        run_dir = out or run_dir_for(recipe)
    summary = run_training(recipe, run_dir, resume=resume, init_from=init_from, force=force,
                           stop_after=stop_after)
    print(json.dumps(summary))
