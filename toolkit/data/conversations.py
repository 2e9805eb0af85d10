"""Conversations JSONL: one conversation per line, either a bare `[{role, content}, ...]` array
(nanochat / InnerArianna style) or `{"messages": [...]}`. Readers accept both.

`markdown_to_conversations` makes single-turn conversations from a markdown folder in template
mode (offline): paragraphs become answers, the nearest heading becomes the question's topic.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterator

from toolkit.data.sources import folder_files, read_jsonl, read_text
from toolkit.errors import UserError
from toolkit.fsio import atomic_write

ROLES = ("system", "user", "assistant")
QUESTION_TEMPLATES = [
    "What can you tell me about {topic}?",
    "Explain {topic}.",
    "Tell me about {topic}.",
    "What does the text say about {topic}?",
    "How would you describe {topic}?",
    "Can you explain {topic} to me?",
]


def validate(messages, where: str) -> list[dict]:
    if isinstance(messages, dict):
        if "messages" not in messages:
            raise UserError(f"{where}: expected a list of messages or {{\"messages\": [...]}}")
        messages = messages["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs a role ({'/'.join(ROLES)}) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: Path) -> Iterator[list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"conversations file not found: {path}")
    for n, row in read_jsonl(path):
        yield validate(row, f"{path}:{n}")


def markdown_chunks(text: str, min_chars: int = 50) -> list[tuple[str, str]]:
    """(heading, paragraph) pairs: blank lines split paragraphs, headings end one; fence lines are
    dropped but the code between them is kept; a paragraph's lines are joined with spaces."""
    chunks, heading, lines = [], "", []

    def flush():
        if lines:
            para = " ".join(lines).strip()
            if len(para) > min_chars:
                chunks.append((heading, para))
            lines.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```") or line.startswith("~~~"):
            continue
        if line.startswith("#"):
            flush()
            heading = line.lstrip("#").strip()
            continue
        if not line:
            flush()
            continue
        lines.append(line)
    flush()
    return chunks


def _topic(heading: str, path: Path) -> str:
    topic = heading or path.stem.replace("-", " ").replace("_", " ")
    topic = re.sub(r"[`*_\[\]]", "", topic).strip()
    return topic[:1].lower() + topic[1:] if topic[:1].isupper() and not topic[:2].isupper() else topic


def markdown_to_conversations(folder: Path, seed: int = 0, max_answer_chars: int = 500,
                              skip_readme: bool = True) -> Iterator[list[dict]]:
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"folder not found: {folder}")
    files = [folder] if folder.is_file() else [p for p in folder_files(folder, skip_readme) if p.suffix != ".jsonl"]
    if not files:
        raise UserError(f"{folder}: no markdown or text files")
    rng = random.Random(seed)
    for path in files:
        chunks = markdown_chunks(read_text(path))
        per_file = min(5, max(3, len(chunks) // 3))  # InnerArianna's rule
        for heading, para in chunks[:per_file]:
            question = rng.choice(QUESTION_TEMPLATES).format(topic=_topic(heading, path))
            yield [{"role": "user", "content": question}, {"role": "assistant", "content": para[:max_answer_chars]}]


def write_conversations(conversations, out: Path, style: str = "array", overwrite: bool = False) -> int:
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --force to replace it")
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for conv in conversations:
                row = conv if style == "array" else {"messages": conv}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        if n == 0:
            raise UserError("no conversations were made (are the markdown paragraphs longer than 50 characters?)")

    atomic_write(out, write)
    return n
