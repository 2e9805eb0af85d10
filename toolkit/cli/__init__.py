"""The `lmkit` command: a Typer app with one small module per subcommand.

This package is the only place that knows about Typer; each command parses and validates its
options and calls the library. A `UserError` anywhere ends in one line on stderr and exit code 1
(`lmkit --debug ...` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.text import Text

from toolkit import __version__, console
from toolkit.errors import UserError

DEBUG = False


# The subcommands, in `lmkit --help` order: name -> (module under toolkit.cli, its Typer app or command function).
# A run imports and builds only the subcommand it names: a one-shot `lmkit chat --prompt` spends its start-up on
# the reply, not on importing and building the other ten (`lmkit --help` and an unknown name build them all).
COMMANDS = {
    "recipes": ("recipes", "app"),
    "audio": ("audio", "app"),
    "data": ("data", "app"),
    "vocab": ("vocab", "vocab"),
    "pretokenize": ("pretokenize", "pretokenize"),
    "train": ("train", "train"),
    "eval": ("eval", "app"),
    "plot": ("plot", "plot"),
    "export": ("export", "export"),
    "chat": ("chat", "chat"),
    "serve": ("serve", "serve"),
}


def _version(value: bool):
    if value:
        print(f"lmkit {__version__}")
        raise typer.Exit()


def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status messages."),
):
    global DEBUG
    DEBUG = debug
    console.set_quiet(quiet)


def build_app(only: str | None = None) -> typer.Typer:
    """The `lmkit` Typer app with every subcommand, or with only the one named `only`."""
    app = typer.Typer(
        name="lmkit",
        help="lmkit: from a folder of text (or music) to a trained, evaluated, exported, chattable language model.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(root)
    for name, (module, attribute) in COMMANDS.items():
        if only is None or name == only:
            command = getattr(importlib.import_module(f"toolkit.cli.{module}"), attribute)
            if isinstance(command, typer.Typer):
                app.add_typer(command, name=name)
            else:
                app.command(name)(command)
    return app


def command_named(argv: list[str]) -> str | None:
    """The subcommand `argv` runs, when it names one: the root options (--debug, -q, ...) take no values, so it is
    the first argument that is not an option."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> None:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        build_app(command_named(argv))(args=argv, prog_name="lmkit")
    except UserError as e:
        if DEBUG:
            raise
        console.console.print(Text.assemble(("error:", "bold red"), f" {e}"), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if DEBUG:
            raise
        console.console.print("interrupted")
        sys.exit(130)
