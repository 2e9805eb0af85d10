"""Where messages and progress go: stderr, so stdout stays clean for results and pipes."""

from __future__ import annotations

from rich.console import Console

# markup off: what users wrote ("[model]" in a recipe error, a path with brackets) prints as it is
console = Console(stderr=True, highlight=False, markup=False)
QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


def info(message: str, style: str | None = None) -> None:
    if not QUIET:
        console.print(message, style=style, soft_wrap=True)


def progress(*extra_columns):
    """A Rich progress bar with rate and ETA; silent under --quiet."""
    # imported here: rich.progress is a fifth of a one-shot `lmkit chat`'s import time, and chat has no bar
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=QUIET,
        transient=False,
    )
