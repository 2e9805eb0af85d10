"""`lmkit pretokenize CORPUS --tokenizer DIR -o DIR`: documents -> llm.c shards."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.console import info
from toolkit.errors import UserError


def pretokenize(
    corpus: Path = typer.Argument(..., help="A corpus folder from `lmkit data`, a folder of llama2.c's "
                                  "headerless uint16 .bin files to convert, or a folder of .npz code files from "
                                  "`lmkit audio encode` (with an audio tokenizer)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A tokenizer folder from `lmkit vocab`."),
    out: Path = typer.Option(..., "--out", "-o", help="The shard folder to write."),
    shard_tokens: int = typer.Option(100_000_000, help="Tokens per shard file."),
    append_eos: bool = typer.Option(False, help="Put EOS after each document (BOS / <|endoftext|> always goes "
                                    "before each)."),
    workers: int = typer.Option(0, help="Tokenizer processes (0 = all cores)."),
    force: bool = typer.Option(False, "--force", help="Replace existing shards in OUT."),
):
    """Tokenize a corpus into train_XXXXXX.bin / val_XXXXXX.bin shards (256 x int32 header, magic 20240520) and
    meta.json, in parallel and streaming."""
    from toolkit import tokenizers
    from toolkit.shards import pretokenize as shards

    if not corpus.exists():
        raise UserError(f"corpus not found: {corpus}")
    if not (corpus / "manifest.json").exists() and any(corpus.glob("*.bin")):
        tok_meta = tokenizers.read_meta(tokenizer)
        meta = shards.convert_llama2c(corpus, out, tok_meta["vocab_size"], tok_meta, overwrite=force)
        info(f"{out}: converted .bin shards ({meta['split_rule']}), {meta['tokens']['train']:,} train / "
             f"{meta['tokens']['val']:,} val tokens")
        return
    if shard_tokens < 1024:
        raise UserError("--shard-tokens: expected at least 1024")
    if corpus.is_dir() and not (corpus / "manifest.json").exists() and any(corpus.rglob("*.npz")):
        from toolkit.shards.audio import pretokenize_codes

        result = pretokenize_codes(corpus, tokenizer, out, shard_tokens=shard_tokens, append_eos=append_eos,
                                   overwrite=force)
        audio = result.meta["audio"]["seconds"]
        info(f"{out}: {result.tokens['train']:,} train / {result.tokens['val']:,} val tokens from "
             f"{audio['train'] + audio['val']:,.0f} s of audio codes")
        return
    result = shards.pretokenize(corpus, tokenizer, out, shard_tokens=shard_tokens, append_eos=append_eos,
                                workers=workers, overwrite=force)
    total = sum(result.tokens.values())
    info(f"{out}: {result.tokens['train']:,} train / {result.tokens['val']:,} val tokens "
         f"in {result.seconds:.1f} s ({total / max(result.seconds, 1e-9):,.0f} tokens/s)")
