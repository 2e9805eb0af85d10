"""Pretokenize throughput: lmkit's multi-process pretokenize vs a single-process loop that encodes one
document at a time (how llama2.c's pretokenize works). Prints JSON.

    python benchmarks/pretokenize.py path/to/tinystories --vocab-size 4096
    python benchmarks/pretokenize.py data/corpus --tokenizer data/tok4096 --repeat 4

SOURCE is a corpus folder (from `lmkit data`) or any `lmkit data` source (it is collected into a
temporary corpus first). Without --tokenizer a sentencepiece vocabulary is trained on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit import console, tokenizers  # noqa: E402
from toolkit.data import build_corpus, iter_documents, read_manifest, write_corpus  # noqa: E402
from toolkit.recipe import DataConfig, TokenizerConfig  # noqa: E402
from toolkit.shards.format import ShardWriter, dtype_for  # noqa: E402
from toolkit.shards.pretokenize import pretokenize  # noqa: E402


def single_process_loop(corpus: Path, tokenizer_dir: Path, out_dir: Path) -> int:
    """llama2.c-style: one process, one document at a time, BOS before each."""
    tok = tokenizers.load(tokenizer_dir)
    total = 0
    for split in ("train", "val"):
        all_tokens = []
        for doc in iter_documents(corpus, split):
            all_tokens.extend([tok.bos_id] + tok.encode(doc))
        writer = ShardWriter(out_dir, split, 100_000_000, dtype_for(tok.vocab_size))
        writer.add(np.array(all_tokens, dtype=writer.dtype))
        writer.close()
        total += writer.total
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--separator", default="blank-line", help="how a raw SOURCE is split into documents")
    ap.add_argument("--workers", type=int, default=0, help="0 = all cores")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the corpus N times (a bigger job)")
    args = ap.parse_args()
    console.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = Path(args.source)
        if not (corpus / "manifest.json").exists():
            # paragraphs as documents: the TinyStories samples mark no story boundaries
            build_corpus(DataConfig(source=args.source, separator=args.separator), tmp / "corpus0")
            corpus = tmp / "corpus0"
        if args.repeat > 1:
            docs = (d for _ in range(args.repeat) for s in ("train", "val") for d in iter_documents(corpus, s))
            write_corpus(docs, tmp / "corpus", 0.1, f"{args.source} x{args.repeat}")
            corpus = tmp / "corpus"
        tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tok"
        if not args.tokenizer:
            tokenizers.build(TokenizerConfig(vocab_size=args.vocab_size), iter_documents(corpus, "train"), tok_dir,
                             quiet=True)
        manifest = read_manifest(corpus)

        t0 = time.perf_counter()
        n_loop = single_process_loop(corpus, tok_dir, Path(tempfile.mkdtemp(dir=tmp)))
        loop_s = time.perf_counter() - t0
        rss_loop = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        res = pretokenize(corpus, tok_dir, tmp / "shards", workers=args.workers)
        n = sum(res.tokens.values())
        assert n == n_loop, (n, n_loop)
        rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({
            "source": args.source,
            "repeat": args.repeat,
            "characters": manifest["chars"]["train"] + manifest["chars"]["val"],
            "tokens": n,
            "tokenizer": tokenizers.read_meta(tok_dir)["kind"],
            "vocab_size": tokenizers.read_meta(tok_dir)["vocab_size"],
            "workers": args.workers or os.cpu_count(),
            "lmkit_tokens_per_s": round(n / res.seconds),
            "lmkit_wall_s": round(res.seconds, 3),
            "loop_tokens_per_s": round(n / loop_s),
            "loop_wall_s": round(loop_s, 3),
            "speedup": round(loop_s / res.seconds, 2),
            "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_mb_loop": round(rss_loop, 1),
            "peak_rss_mb_worker": round(rss_children, 1),
        }, indent=2))


if __name__ == "__main__":
    main()
