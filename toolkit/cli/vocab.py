"""`lmkit vocab CORPUS -o DIR`: train or set up a tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.console import info
from toolkit.errors import UserError
from toolkit.recipe import TokenizerConfig, build_table


def vocab(
    corpus: Path = typer.Argument(None, help="A corpus folder from `lmkit data` (needed for sentencepiece)."),
    out: Path = typer.Option(..., "--out", "-o", help="The tokenizer folder to write."),
    kind: str = typer.Option("sentencepiece", help="sentencepiece (BPE, trained), tiktoken (by encoding name), "
                             "bytes (256 bytes + pad/eos/bos/sentinels) or audio (EnCodec codes; no corpus)."),
    vocab_size: int = typer.Option(4096, help="sentencepiece: vocabulary size to train."),
    encoding: str = typer.Option("gpt2", help="tiktoken: encoding name (gpt2, cl100k_base, o200k_base, ...)."),
    vocab_cap: int = typer.Option(0, help="tiktoken: cap the vocabulary (0 = none); needs --cap-policy fold."),
    cap_policy: str = typer.Option("none", help="tiktoken with --vocab-cap: 'fold' maps id -> id % cap (lossy, "
                                   "as BoggersTheLLM does) or 'none'."),
    n_sentinels: int = typer.Option(100, help="bytes, audio: number of sentinel ids for span denoising."),
    layout: str = typer.Option("flatten", help="audio: codebook0 (the seed's: codebook 0 only), flatten "
                               "(frame-major, all codebooks) or delay (MusicGen's delay pattern)."),
    n_codebooks: int = typer.Option(8, help="audio: codebooks in the token stream (8 = EnCodec 24 kHz at 6 kbps)."),
    codebook_size: int = typer.Option(1024, help="audio: codes per codebook."),
    max_sentences: int = typer.Option(2_000_000, help="sentencepiece: at most this many lines to train on."),
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer folder."),
):
    """Make a tokenizer folder (tokenizer.json; sentencepiece adds tokenizer.model and llama2.c's tokenizer.bin)."""
    from toolkit import tokenizers
    from toolkit.data import iter_documents, read_manifest

    cfg = build_table(TokenizerConfig, dict(kind=kind, vocab_size=vocab_size, encoding=encoding, vocab_cap=vocab_cap,
                                            cap_policy=cap_policy, n_sentinels=n_sentinels,
                                            max_sentences=max_sentences, layout=layout, n_codebooks=n_codebooks,
                                            codebook_size=codebook_size), "options")
    if (out / tokenizers.META_FILE).exists() and not force:
        raise UserError(f"{out} already holds a tokenizer; pass --force to replace it")
    docs = None
    if kind == "sentencepiece":
        if corpus is None:
            raise UserError("sentencepiece needs a corpus folder: lmkit vocab data/corpus -o data/tok4096")
        read_manifest(corpus)
        docs = iter_documents(corpus, "train")
    from toolkit.console import QUIET

    tok = tokenizers.build(cfg, docs, out, quiet=QUIET)
    info(f"{out}: {tok.kind} tokenizer, {tok.vocab_size:,} tokens, fingerprint {tok.fingerprint}")
