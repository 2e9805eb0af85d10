"""`lmkit export RUN -o model.bin` (run folder -> llama2.c) and `lmkit export model.bin -z tokenizer.bin -o DIR`
(llama2.c -> run folder)."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.console import info
from toolkit.errors import UserError


def export(
    source: Path = typer.Argument(..., help="A run folder to export, or a llama2.c model.bin (v0, v1 or v2) "
                                  "to import."),
    out: Path = typer.Option(..., "--out", "-o", help="Export: the .bin file to write (tokenizer.bin and a "
                             "model.json sidecar go beside it). Import: the run folder to write."),
    fmt: str = typer.Option("", "--format", "-f", help="Export: v0 (legacy, what run.c reads), v1 (fp32 with a "
                            "header) or v2 (int8 Q8_0, for runq.c). Default: the recipe's export.format."),
    group_size: int = typer.Option(0, "--group-size", help="Export v2: Q8 group size; must divide dim and "
                                   "hidden_dim (0 = the recipe's, else the largest of 64, 32, ... that does)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", "-z", help="Import: the model's tokenizer.bin "
                                   "(default: the one beside the model)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
):
    """Convert between run folders and llama2.c's model.bin files (both directions, chosen by SOURCE)."""
    from toolkit import export as ex
    from toolkit.run import is_run

    if source.is_dir():
        if tokenizer is not None:
            raise UserError("-z/--tokenizer is for importing a .bin; a run folder exports its own tokenizer")
        if not is_run(source):
            raise UserError(f"{source} is not a run folder (needs model.safetensors and recipe.toml)")
        from toolkit import recipe as recipe_lib

        cfg = recipe_lib.load(source / "recipe.toml").export
        fmt = fmt or cfg.format
        if group_size and fmt != "v2":
            raise UserError(f"--group-size is for --format v2 (int8); {fmt} is fp32")
        result = ex.export_run(source, out, fmt, group_size or cfg.group_size, force)
        h = result.header
        extra = f", group size {h.group_size}" if h.version == 2 else ""
        info(f"{out}: llama2.c v{h.version}{extra}, {out.stat().st_size:,} bytes "
             f"(dim {h.dim}, {h.n_layers} layers, vocab {h.vocab_size}, "
             f"{'shared' if h.shared_classifier else 'separate'} classifier)")
        for path in result.files[1:]:
            info(f"  + {path}")
        for w in result.warnings:
            info(f"warning: {w}", style="yellow")
        if h.version == 0 and not result.warnings:
            tok = next((p for p in result.files if p.name == "tokenizer.bin"), None)
            info(f"run it with llama2.c: ./run {out} -z {tok} -t 0 -n 256 -i \"Once upon a time\"")
        return
    if not source.exists():
        raise UserError(f"not found: {source} (give a run folder to export or a llama2.c model.bin to import)")
    if fmt or group_size:
        raise UserError("--format and --group-size are for exporting; an import reads them from the .bin header")
    folder = ex.import_bin(source, tokenizer, out, force)
    info(f"{folder}: run folder imported from {source}; try: lmkit chat {folder}")
