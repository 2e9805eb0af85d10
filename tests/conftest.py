"""Shared fixtures: everything is made here, small, with no network and nothing from ../shared."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a cat dog sun moon river tree stone bird song light dark run jump sing walk happy sad big small red "
         "blue green house road town sea sky wind rain snow fire day night friend mother father child story "
         "ship apple bread milk water garden flower door window").split()


def make_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]) + (f" {i}" if i % 7 == 0 else ""))
    return " ".join(sentences)


def lmkit(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from toolkit.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small corpus folder (about 300 KB of random-word text in 300 documents)."""
    from toolkit.data import write_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    docs = [make_text(40, seed=i) for i in range(300)]
    write_corpus(docs, out, val_fraction=0.1, source="test")
    return out


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory, corpus_dir):
    from toolkit import tokenizers
    from toolkit.data import iter_documents
    from toolkit.recipe import TokenizerConfig

    out = tmp_path_factory.mktemp("tok") / "tok"
    tokenizers.build(TokenizerConfig(kind="sentencepiece", vocab_size=400), iter_documents(corpus_dir, "train"), out,
                     quiet=True)
    return out


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core CPU: one torch thread avoids oversubscribed OpenMP pools (3-50x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def lmkit_cache(tmp_path_factory):
    """Corpus/tokenizer/shard products of `lmkit train` go to a per-session cache."""
    path = tmp_path_factory.mktemp("lmkit-cache")
    os.environ["LMKIT_CACHE"] = str(path)
    return path


TINY_RECIPE = """
name = "tiny"
[model]
family = "llama"
dim = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
multiple_of = 16
max_seq_len = 32
[tokenizer]
kind = "bytes"
n_sentinels = 0
[data]
source = "synthetic"
synthetic_stories = 300
[train]
device = "cpu"
dtype = "float32"
batch_size = 4
grad_accum = 2
max_iters = 12
lr = 3e-3
warmup_iters = 2
eval_interval = 6
eval_iters = 2
log_interval = 1
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_RECIPE)
    return p
