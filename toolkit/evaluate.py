"""Evaluation: token-level cross-entropy, perplexity and bits per byte on fixed val windows.

Every run is evaluated on the same non-overlapping windows from the start of the val split, so
numbers from different runs and seeds compare. Bits per byte counts the UTF-8 bytes each target
token stands for, so tokenizers with different vocabularies compare too.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.shards.sampler import eval_windows


@dataclass
class EvalResult:
    loss: float  # mean token-level cross-entropy, nats
    ppl: float
    bpb: float | None  # bits per UTF-8 byte
    tokens: int
    windows: int
    extras: dict = field(default_factory=dict)  # family-specific metrics, under their own names

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model, shards, split: str, seq_len: int, batch_size: int, max_batches: int, device,
             autocast_ctx=None, token_bytes: np.ndarray | None = None) -> EvalResult:
    """Clean CE over the first `max_batches` x `batch_size` windows of `split`; a family's own metrics (the
    model's `eval_forward`) come back in `extras`, per scored token. A span-corruption model (T5) is scored on the
    windows corrupted with the fixed validation corruption; its targets hold sentinels, so no bits per byte."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens, total_bytes, windows = 0.0, 0, 0, 0
    extras: dict[str, float] = {}
    span_corruption = model.objective == "span_corruption"
    byte_table = torch.as_tensor(token_bytes, device=device) if token_bytes is not None and not span_corruption \
        else None
    for i, (x, y) in enumerate(eval_windows(shards, split, seq_len, batch_size, max_batches)):
        if span_corruption:
            from toolkit.shards.span_corruption import eval_batch

            x, y = eval_batch(model.config, x, i)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast_ctx or contextlib.nullcontext():
            logits, batch_extras = model.eval_forward(x, y)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none",
                                 ignore_index=-1)
        valid = y >= 0  # targets masked out (-1, e.g. prompts in chat data) are not counted
        total_loss += losses.sum().item()
        total_tokens += int(valid.sum())
        windows += x.shape[0]
        if byte_table is not None:
            total_bytes += (byte_table[y.clamp(min=0)] * valid).sum().item()
        for name, value in batch_extras.items():
            extras[name] = extras.get(name, 0.0) + float(value)
    model.train(was_training)
    loss = total_loss / total_tokens
    bpb = total_loss / (math.log(2) * total_bytes) if total_bytes else None
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50.0)), bpb=bpb, tokens=total_tokens, windows=windows,
                      extras={k: v / total_tokens for k, v in extras.items()})


def run_shards(run, data: str | None, tmp: Path) -> Path:
    """The shards a run is evaluated on: `data` (any text source, tokenized with the run's tokenizer into `tmp`),
    else the run's own val shards, rebuilt from its recipe when they are gone."""
    from dataclasses import replace

    from toolkit.data import build_corpus
    from toolkit.recipe import DataConfig
    from toolkit.run import TOKENIZER
    from toolkit.shards.pretokenize import pretokenize

    if data:
        corpus = Path(data)
        if not (corpus / "manifest.json").is_file():
            build_corpus(DataConfig(source=data, val_fraction=0.5), tmp / "corpus")
            corpus = tmp / "corpus"
            _all_to_val(corpus)  # all of a given file is evaluated
        pretokenize(corpus, run.path / TOKENIZER, tmp / "shards", workers=1)
        return tmp / "shards"
    shards_dir = Path(run.info.get("data", {}).get("shards", ""))
    if (shards_dir / "meta.json").is_file():
        return shards_dir
    from toolkit.shards.prepare import prepare

    tok_cfg = replace(run.recipe.tokenizer, path=str(run.path / TOKENIZER))
    return prepare(run.recipe.replace(tokenizer=tok_cfg)).shards


def _all_to_val(corpus: Path) -> None:
    """A corpus whose val split holds every document (its train split stays, unused, so the folder is valid)."""
    import json

    from toolkit.fsio import atomic_write_text

    train, val = corpus / "train.jsonl", corpus / "val.jsonl"
    atomic_write_text(val, train.read_text(encoding="utf-8") + val.read_text(encoding="utf-8"))
    m = json.loads((corpus / "manifest.json").read_text())
    for key in ("documents", "chars", "bytes"):
        m[key]["val"] += m[key]["train"]
    atomic_write_text(corpus / "manifest.json", json.dumps(m))


def evaluate_run(run, device, batches: int = 0, batch_size: int = 0, data: str | None = None) -> EvalResult:
    """A run's clean CE, perplexity and bits per byte: on its val shards' first `batches` x `batch_size` windows
    (0 = the recipe's eval settings), or on the text `data`. `run` is a run folder or a loaded run."""
    import tempfile

    from toolkit.device import autocast, resolve_dtype
    from toolkit.run import Run, load_run
    from toolkit.shards.format import ShardSet

    if not isinstance(run, Run):
        run = load_run(run, device)
    rc = run.recipe
    with tempfile.TemporaryDirectory() as tmp:
        shards = ShardSet(run_shards(run, data, Path(tmp)))
        shards.check_tokenizer(run.tokenizer)
        return evaluate(run.model, shards, "val", rc.model.max_seq_len, batch_size or rc.eval.batch_size or
                        rc.train.batch_size, batches or rc.eval.max_batches, device,
                        autocast(device, resolve_dtype(rc.train.dtype, device)), run.tokenizer.token_bytes())
