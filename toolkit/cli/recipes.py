"""`lmkit recipes list | show NAME | copy NAME DEST`: the recipes shipped in recipes/."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from toolkit import recipe as recipes_lib
from toolkit.console import info
from toolkit.errors import UserError

app = typer.Typer(help="List, show and copy the recipes shipped with lmkit (like `tune ls` / `tune cp`).",
                  no_args_is_help=True)


@app.command("list")
def list_recipes():
    """List the shipped recipes with their model family and size."""
    table = Table("family", "model", "tokenizer", "data", "description")
    table.add_column("name", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for path in recipes_lib.shipped():
        r = recipes_lib.load(path)
        m = r.model
        shape = "/".join(str(getattr(m, k)) for k in ("dim", "n_layers", "n_heads") if hasattr(m, k))
        tok = r.tokenizer.kind + (f" {r.tokenizer.vocab_size}" if r.tokenizer.kind == "sentencepiece" else "")
        table.add_row(path.stem, m.family, shape, tok, r.data.source, r.description)
    Console(width=max(120, Console().width), markup=False).print(table)


@app.command("show")
def show(name: str = typer.Argument(..., help="A shipped recipe's name or a .toml path."),
         set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.lr=3e-4 (repeatable).")):
    """Print a recipe with every default filled in (what `lmkit train` would use)."""
    print(recipes_lib.load(name, set_).to_toml(), end="")


@app.command("copy")
def copy(name: str = typer.Argument(..., help="A shipped recipe's name."),
         dest: Path = typer.Argument(..., help="Where to write the copy (a .toml file or a folder)."),
         force: bool = typer.Option(False, "--force", help="Replace DEST if it exists.")):
    """Copy a shipped recipe to edit it."""
    src = recipes_lib.resolve_path(name)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it")
    dest.write_text(src.read_text())
    info(f"copied {src.name} -> {dest}")
