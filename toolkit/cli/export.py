"""`lmkit export RUN -o PATH --format v0|v1|v2|hf|gguf` (run folder -> llama2.c .bin, transformers folder or GGUF)
and `lmkit export model.bin|model.gguf|HF_DIR -o RUN` (-> run folder)."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.console import info
from toolkit.errors import UserError


def export(
    source: Path = typer.Argument(..., help="A run folder to export; or, to import, a llama2.c model.bin (v0, v1 "
                                  "or v2), a .gguf file or a Hugging Face llama folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Export: the .bin or .gguf file to write (tokenizer.bin and a "
                             "model.json sidecar go beside a .bin), or the folder for --format hf. Import: the run "
                             "folder to write."),
    fmt: str = typer.Option("", "--format", "-f", help="Export: v0 (legacy, what run.c reads), v1 (fp32 with a "
                            "header), v2 (int8 Q8_0, for runq.c), hf (transformers folder) or gguf (llama.cpp, "
                            "Ollama). Default: the recipe's export.format."),
    dtype: str = typer.Option("", "--dtype", help="hf: f32 (default), f16 or bf16. gguf: f16 (default), f32, bf16 "
                              "or q8_0."),
    group_size: int = typer.Option(0, "--group-size", help="Export v2: Q8 group size; must divide dim and "
                                   "hidden_dim (0 = the recipe's, else the largest of 64, 32, ... that does)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", "-z", help="Import of a .bin: the model's tokenizer.bin "
                                   "(default: the one beside the model)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
):
    """Convert between run folders and llama2.c .bin, Hugging Face and GGUF (both directions, chosen by SOURCE)."""
    from toolkit import export as ex
    from toolkit.run import is_run

    if source.is_dir() and is_run(source):
        if tokenizer is not None:
            raise UserError("-z/--tokenizer is for importing a .bin; a run folder exports its own tokenizer")
        from toolkit import recipe as recipe_lib

        cfg = recipe_lib.load(source / "recipe.toml").export
        fmt = fmt or cfg.format
        if fmt in ex.HF_FORMATS:
            if group_size:
                raise UserError(f"--group-size is for --format v2; --format {fmt} takes --dtype")
            export_other(ex, source, out, fmt, dtype or ex.DEFAULT_DTYPE[fmt], force)
            return
        if dtype:
            raise UserError(f"--dtype is for --format hf or gguf; llama2.c {fmt} is fixed (v0/v1 fp32, v2 int8)")
        export_bin(ex, source, out, fmt, group_size or cfg.group_size, group_size, force)
        return
    if not source.exists():
        raise UserError(f"not found: {source} (give a run folder to export, or a .bin, .gguf or HF folder to import)")
    if fmt or group_size or dtype:
        raise UserError("--format, --dtype and --group-size are for exporting; an import reads them from the file")
    if tokenizer is not None and (source.is_dir() or source.suffix.lower() == ".gguf"):
        raise UserError("-z/--tokenizer is for importing a llama2.c .bin; this source carries its own tokenizer")
    folder = ex.import_any(source, out, tokenizer, force)
    info(f"{folder}: run folder imported from {source}; try: lmkit chat {folder}")


def export_bin(ex, source: Path, out: Path, fmt: str, group_size: int, given_group_size: int, force: bool) -> None:
    if given_group_size and fmt != "v2":
        raise UserError(f"--group-size is for --format v2 (int8); {fmt} is fp32")
    result = ex.export_run(source, out, fmt, group_size, force)
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


def export_other(ex, source: Path, out: Path, fmt: str, dtype: str, force: bool) -> None:
    if fmt == "hf":
        result = ex.export_hf(source, out, dtype, force)
        import json

        arch = json.loads((out / "config.json").read_text())["architectures"][0]
        info(f"{out}: transformers {arch} ({dtype}): {', '.join(result.files)}")
        info(f"load it with AutoModelForCausalLM.from_pretrained(\"{out}\"); publish it with: "
             f"huggingface-cli upload USER/NAME {out}")
    else:
        result = ex.export_gguf(source, out, dtype, force)
        info(f"{out}: GGUF llama ({dtype}), {out.stat().st_size:,} bytes")
        info(f"run it with llama.cpp: llama-cli -m {out} -p \"Once upon a time\" -n 128 --temp 0; or: lmkit chat {out}")
    for w in result.warnings:
        info(f"warning: {w}", style="yellow")
