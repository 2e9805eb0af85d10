"""A corpus folder: train.jsonl and val.jsonl ({"text": ...} per line) plus manifest.json.

The split is by document and deterministic: every k-th document (k = round(1 / val_fraction)) goes
to val. Neither side is ever empty: with fewer than k documents the last one goes to val, and a
single document is split by position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from toolkit.errors import UserError
from toolkit.fsio import build_atomically

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def _write_line(f, split: str, text: str, digest) -> int:
    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
    f.write(line)
    digest.update(split.encode() + line.encode("utf-8"))  # the split is part of what the corpus is
    return len(text.encode("utf-8"))


def write_corpus(docs: Iterable[str], out_dir: Path, val_fraction: float, source: str, config: dict | None = None,
                 overwrite: bool = False) -> dict:
    """Stream documents into a corpus folder; returns the manifest."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise UserError(f"{out_dir} already holds a corpus; remove it or pass --force to replace it")

    def build(tmp: Path) -> dict:
        k = max(2, round(1.0 / val_fraction))
        counts = {s: {"documents": 0, "chars": 0, "bytes": 0} for s in SPLITS}
        digest = hashlib.sha256()
        held: str | None = None  # one document of look-ahead, so the last can still go to val
        n = 0
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as ftrain, open(tmp / "val.jsonl", "w",
                                                                              encoding="utf-8") as fval:
            files = {"train": ftrain, "val": fval}

            def put(split: str, text: str):
                counts[split]["documents"] += 1
                counts[split]["chars"] += len(text)
                counts[split]["bytes"] += _write_line(files[split], split, text, digest)

            for doc in docs:
                if held is not None:
                    put("val" if (n - 1) % k == k - 1 else "train", held)
                held = doc
                n += 1
            if held is None:
                raise UserError(f"the source {source!r} gave no documents (empty files or folder?)")
            if n == 1:  # one long document: split by position
                cut = max(1, int(len(held) * (1 - val_fraction)))
                if len(held) < 2:
                    raise UserError(f"the source {source!r} has a single document of {len(held)} character(s): too small")
                put("train", held[:cut])
                put("val", held[cut:])
            elif counts["val"]["documents"] == 0:
                put("val", held)
            else:
                put("val" if (n - 1) % k == k - 1 else "train", held)
        manifest = {
            "source": source,
            "documents": {s: counts[s]["documents"] for s in SPLITS},
            "chars": {s: counts[s]["chars"] for s in SPLITS},
            "bytes": {s: counts[s]["bytes"] for s in SPLITS},  # UTF-8, for bits per byte
            "val_fraction": val_fraction,
            "sha256": digest.hexdigest(),
            "config": config or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    return build_atomically(out_dir, build)


def build_corpus(cfg, out_dir: Path, overwrite: bool = False) -> dict:
    from toolkit.data.sources import documents

    return write_corpus(documents(cfg), out_dir, cfg.val_fraction, cfg.source, dataclasses.asdict(cfg), overwrite)


def read_manifest(corpus_dir: Path) -> dict:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{corpus_dir} is not a corpus folder (no {MANIFEST}); make one with `lmkit data SOURCE -o DIR`")
    return json.loads(path.read_text())


def iter_documents(corpus_dir: Path, split: str) -> Iterator[str]:
    read_manifest(corpus_dir)
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
