"""The `lmkit` command: a Typer app with one small module per subcommand.

This package is the only place that knows about Typer; each command parses and validates its
options and calls the library. A `UserError` anywhere ends in one line on stderr and exit code 1
(`lmkit --debug ...` shows the traceback instead).
"""

from __future__ import annotations

import sys

import click
import typer
from rich.text import Text

from toolkit import __version__, console
from toolkit.errors import UserError

DEBUG = False


app = typer.Typer(
    name="lmkit",
    help="lmkit: from a folder of text (or music) to a trained, evaluated, exported, chattable language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"lmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status messages."),
):
    global DEBUG
    DEBUG = debug
    console.set_quiet(quiet)


def _register():
    from toolkit.cli import audio, data, eval, pretokenize, recipes, train, vocab

    app.add_typer(recipes.app, name="recipes")
    app.add_typer(audio.app, name="audio")
    app.add_typer(data.app, name="data")
    app.command("vocab")(vocab.vocab)
    app.command("pretokenize")(pretokenize.pretokenize)
    app.command("train")(train.train)
    app.add_typer(eval.app, name="eval")
    from toolkit.cli import plot

    app.command("plot")(plot.plot)

    from toolkit.cli import chat, export

    app.command("export")(export.export)
    app.command("chat")(chat.chat)
    from toolkit.cli import serve
    app.command("serve")(serve.serve)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="lmkit")
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
    except click.exceptions.Exit as e:  # raised when standalone_mode is off
        sys.exit(e.exit_code)
