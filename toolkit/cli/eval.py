"""`lmkit eval RUN`: val loss, perplexity and bits per byte."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.table import Table

from toolkit.console import console


def eval_run(
    run: Path = typer.Argument(..., help="A run folder from `lmkit train`."),
    data: str = typer.Option(None, "--data", help="Evaluate on this text instead of the run's val shards: a .txt/.md/"
                             ".jsonl file, a folder, or a corpus folder from `lmkit data` (its val split)."),
    batches: int = typer.Option(0, help="Number of val batches (0 = the recipe's eval.max_batches)."),
    batch_size: int = typer.Option(0, help="Sequences per batch (0 = the recipe's)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Token-level cross-entropy, perplexity and bits per byte on fixed val windows (the same for every run)."""
    from toolkit.evaluate import evaluate
    from toolkit.shards import ShardSet
    from toolkit.train import checkpoint as ckpt
    from toolkit.train.device import autocast, resolve_device, resolve_dtype

    dev = resolve_device(device)
    r = ckpt.load_run(run, dev)
    seq_len = r.recipe.model.max_seq_len
    with tempfile.TemporaryDirectory() as tmp:
        if data:
            shards_dir, source = _tokenize_text(data, r, Path(tmp)), data
        else:
            shards_dir, source = Path(r.info.get("data", {}).get("shards", "")), "val shards"
            if not (shards_dir / "meta.json").is_file():
                from toolkit.train.pipeline import prepare

                shards_dir = prepare(r.recipe.replace(tokenizer=_with_path(r))).shards
        shards = ShardSet(shards_dir)
        shards.check_tokenizer(r.tokenizer)
        tb = r.tokenizer.token_bytes() if hasattr(r.tokenizer, "token_bytes") else None
        res = evaluate(r.model, shards, "val", seq_len, batch_size or r.recipe.eval.batch_size or
                       r.recipe.train.batch_size, batches or r.recipe.eval.max_batches, dev,
                       autocast(dev, resolve_dtype(r.recipe.train.dtype, dev)), tb)
    out = {"run": str(run), "step": r.step, "data": source, **res.to_dict()}
    if as_json:
        print(json.dumps(out))
        return
    table = Table(title=f"{run} (step {r.step}) on {source}")
    for col in ("val loss (nats)", "perplexity", "bits per byte", "tokens", "windows"):
        table.add_column(col, justify="right")
    for name in res.extras:
        table.add_column(name, justify="right")
    table.add_row(f"{res.loss:.4f}", f"{res.ppl:.2f}", f"{res.bpb:.4f}" if res.bpb else "-", f"{res.tokens:,}",
                  str(res.windows), *(f"{v:.4f}" for v in res.extras.values()))
    console.print(table)


def _with_path(r):
    from dataclasses import replace

    from toolkit.train.checkpoint import TOKENIZER

    return replace(r.recipe.tokenizer, path=str(r.path / TOKENIZER))


def _tokenize_text(data: str, r, tmp: Path) -> Path:
    """Any text source -> shards with the run's tokenizer; a corpus folder's val split is used as is."""
    from toolkit.data import build_corpus
    from toolkit.recipe import DataConfig
    from toolkit.shards import pretokenize
    from toolkit.train.checkpoint import TOKENIZER

    corpus = Path(data)
    if not (corpus / "manifest.json").is_file():
        # all of a given file is evaluated: it goes to the val split whole
        build_corpus(DataConfig(source=data, val_fraction=0.5), tmp / "corpus")
        corpus = tmp / "corpus"
        _all_to_val(corpus)
    pretokenize(corpus, r.path / TOKENIZER, tmp / "shards", workers=1)
    return tmp / "shards"


def _all_to_val(corpus: Path) -> None:
    import json as _json

    train, val = corpus / "train.jsonl", corpus / "val.jsonl"
    val.write_text(train.read_text() + val.read_text())
    m = _json.loads((corpus / "manifest.json").read_text())
    for key in ("documents", "chars", "bytes"):
        m[key]["val"] += m[key]["train"]
    (corpus / "manifest.json").write_text(_json.dumps(m))
