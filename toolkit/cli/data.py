"""`lmkit data SOURCE -o DIR` and `lmkit data conversations FOLDER -o FILE`."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.cli.groups import DefaultCommandGroup
from toolkit.console import info
from toolkit.recipe import DataConfig, build_table

app = typer.Typer(
    cls=DefaultCommandGroup,
    no_args_is_help=True,
    help="Turn a source into a corpus folder (`lmkit data SOURCE -o DIR`), or markdown into conversations "
    "(`lmkit data conversations FOLDER -o FILE`).",
)


@app.command("build")
def build(
    source: str = typer.Argument(..., help="A folder of .md/.txt (recursive), a .txt/.md/.jsonl file, "
                                 "hf:NAME (a Hugging Face dataset) or 'synthetic' (the built-in stories)."),
    out: Path = typer.Option(..., "--out", "-o", help="The corpus folder to write."),
    text_field: str = typer.Option("text", help=".jsonl and hf: the field holding the text."),
    separator: str = typer.Option("", help="Split .txt files into documents: '' = auto (<|endoftext|> if present, "
                                  "else blank lines; whole files inside folders), 'blank-line', 'none', or a literal."),
    strip_markdown: bool = typer.Option(False, help="Remove front matter, HTML comments, code fences, link targets "
                                        "and template directives (raw by default, as InnerArianna)."),
    include_readme: bool = typer.Option(False, help="Folders: keep files whose name starts with README."),
    hf_config: str = typer.Option("", help="hf: dataset configuration name (e.g. sample-10BT for fineweb-edu)."),
    hf_split: str = typer.Option("train", help="hf: split to read."),
    streaming: bool = typer.Option(False, help="hf: stream rows instead of downloading the whole dataset."),
    max_rows: int = typer.Option(0, help="Stop after this many documents (0 = all)."),
    max_chars: int = typer.Option(0, help="Stop after this many characters (0 = all)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of documents for the val split (by document)."),
    stories: int = typer.Option(12_000, help="synthetic: number of stories (about 500 characters each)."),
    seed: int = typer.Option(0, help="synthetic: generator seed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing corpus folder."),
):
    """Collect documents from SOURCE into a corpus folder: train.jsonl, val.jsonl, manifest.json."""
    from toolkit.data import build_corpus

    cfg = build_table(DataConfig, dict(
        source=source, text_field=text_field, separator=separator, strip_markdown=strip_markdown,
        skip_readme=not include_readme, hf_config=hf_config, hf_split=hf_split, streaming=streaming,
        max_rows=max_rows, max_chars=max_chars, val_fraction=val_fraction, synthetic_stories=stories, seed=seed),
        "options")
    m = build_corpus(cfg, out, overwrite=force)
    info(f"{out}: {m['documents']['train']:,} train / {m['documents']['val']:,} val documents, "
         f"{m['chars']['train'] + m['chars']['val']:,} characters")


@app.command("conversations")
def conversations(
    folder: Path = typer.Argument(..., help="A markdown folder (or file)."),
    out: Path = typer.Option(..., "--out", "-o", help="The conversations .jsonl to write."),
    style: str = typer.Option("array", "--format", help="'array': a bare [{role, content}, ...] per line "
                              "(InnerArianna/nanochat); 'messages': {\"messages\": [...]} per line."),
    seed: int = typer.Option(0, help="Seed for the question templates."),
    max_answer_chars: int = typer.Option(500, help="Cut answers to this many characters."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Make single-turn conversations from markdown paragraphs (template mode, offline)."""
    from toolkit.data.conversations import markdown_to_conversations, write_conversations
    from toolkit.errors import UserError

    if style not in ("array", "messages"):
        raise UserError(f"--format: expected 'array' or 'messages', got {style!r}")
    n = write_conversations(markdown_to_conversations(folder, seed, max_answer_chars), out, style, force)
    info(f"{out}: {n} conversations")
