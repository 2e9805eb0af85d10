"""Sources -> an iterator of text documents, in a stable order.

A source is a folder (markdown/text, recursive), a .md/.txt/.jsonl file, `hf:NAME` (a Hugging Face
dataset) or `synthetic` (the built-in story generator).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from toolkit.errors import UserError
from toolkit.hub import offline_unless_reachable

TEXT_SUFFIXES = (".md", ".markdown", ".txt")
EOT = "<|endoftext|>"

_FRONT_MATTER = re.compile(r"\A(?:---|\+\+\+)\n.*?\n(?:---|\+\+\+)\n", re.S)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_CODE_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*\n?", re.S | re.M)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*\S+.*$", re.M)
_DIRECTIVE = re.compile(r"\{\{[#%]?.*?\}\}|\{%.*?%\}", re.S)  # {{#include ...}}, {% raw %}, {{ var }}
_BLANKS = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Remove what is markup rather than prose: front matter, HTML comments, fenced code,
    link targets (the link text stays), reference definitions and template directives."""
    text = _FRONT_MATTER.sub("", text)
    text = _HTML_COMMENT.sub("", text)
    text = _CODE_FENCE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_DEF.sub("", text)
    text = _DIRECTIVE.sub("", text)
    return _BLANKS.sub("\n\n", text).strip()


def split_text(text: str, separator: str) -> list[str]:
    """'' = auto: <|endoftext|> if the text has it, else blank-line paragraphs; 'none' = one document."""
    if separator == "none":
        parts = [text]
    elif separator in ("", "auto"):
        parts = text.split(EOT) if EOT in text else re.split(r"\n\s*\n", text)
    elif separator == "blank-line":
        parts = re.split(r"\n\s*\n", text)
    else:
        parts = text.split(separator.encode().decode("unicode_escape"))
    return [p.strip() for p in parts if p.strip()]


def folder_files(folder: Path, skip_readme: bool = True) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + (".jsonl",)]
    if skip_readme:
        files = [p for p in files if not p.name.upper().startswith("README")]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) for each non-blank line; a bad line is a clear error naming it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:  # json's decoder recurses once per nesting level
                raise UserError(f"{path}:{n}: JSON nested too deeply to read") from None


def jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for n, row in read_jsonl(path):
        if isinstance(row, str):
            text = row
        elif isinstance(row, dict) and text_field in row:
            text = row[text_field]
        else:
            raise UserError(f"{path}:{n}: no {text_field!r} field (set the text field with --text-field)")
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: field {text_field!r} is not a string")
        if text.strip():
            yield text


def file_documents(path: Path, cfg, in_folder: bool) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from jsonl_documents(path, cfg.text_field)
        return
    text = read_text(path)
    if cfg.strip_markdown and path.suffix.lower() in (".md", ".markdown"):
        text = strip_markdown(text)
    # a file inside a folder is one document (InnerArianna), unless a separator is given
    separator = cfg.separator or ("none" if in_folder else "")
    yield from split_text(text, separator)


def hf_documents(name: str, cfg) -> Iterator[str]:
    offline_unless_reachable()
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, cfg.hf_config or None, split=cfg.hf_split, streaming=cfg.streaming)
    except Exception as e:
        if _is_offline_error(e):
            raise UserError(f"cannot reach the Hugging Face hub to get dataset {name!r} (offline?); "
                            "download it where there is internet, or use local files: lmkit data path/to/file.txt"
                            ) from None
        raise UserError(f"could not load Hugging Face dataset {name!r}: {type(e).__name__}: {e}") from None
    field = cfg.text_field
    for row in ds:
        if field not in row:
            fields = ", ".join(row)
            raise UserError(f"dataset {name!r} has no field {field!r} (fields: {fields}); set --text-field")
        if row[field] and row[field].strip():
            yield row[field].strip()


def _is_offline_error(e: BaseException) -> bool:
    names = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
             "ConnectError", "MaxRetryError", "NameResolutionError", "DatasetNotFoundError"}
    while e is not None:
        if type(e).__name__ in names or "offline" in str(e).lower() or "resolve" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def limited(docs: Iterator[str], max_rows: int, max_chars: int) -> Iterator[str]:
    chars = 0
    for n, doc in enumerate(docs):
        if max_rows and n >= max_rows:
            return
        if max_chars and chars + len(doc) > max_chars:
            if chars < max_chars:
                yield doc[: max_chars - chars]
            return
        chars += len(doc)
        yield doc


def documents(cfg) -> Iterator[str]:
    """All documents of the [data] table's source, in a stable order."""
    source = cfg.source
    if source == "synthetic":
        from toolkit.data.synthetic import stories

        docs = stories(cfg.synthetic_stories, seed=cfg.seed)
    elif source.startswith("hf:"):
        docs = hf_documents(source[3:], cfg)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = folder_files(path, cfg.skip_readme)
            if not files:
                raise UserError(f"{path}: no .md, .txt or .jsonl files in this folder")
            docs = (doc for f in files for doc in file_documents(f, cfg, in_folder=True))
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES + (".jsonl",):
                raise UserError(f"{path}: expected a .md, .txt or .jsonl file, or a folder of them")
            docs = file_documents(path, cfg, in_folder=False)
        else:
            raise UserError(f"data source not found: {source} (a folder, a .md/.txt/.jsonl file, hf:NAME or synthetic)")
    return limited(docs, cfg.max_rows, cfg.max_chars)
