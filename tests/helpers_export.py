"""Tiny run folders and tokenizers for the export, generation and chat tests (no network, no training CLI)."""

from __future__ import annotations

from pathlib import Path

import torch

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "dog Max. One day, Lily found a shiny red ball under a big tree. She was very happy and ran home to show "
         "her mom. Her mom smiled and said, \"What a lovely ball!\" Lily and Max played with the ball all day. ")


def corpus(n: int = 200) -> list[str]:
    """Varied story lines (names, objects, a few non-ASCII words) for a small sentencepiece vocabulary."""
    names = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia", "Zoë", "José"]
    things = ["ball", "kite", "cake", "tree", "boat", "hat", "café", "book"]
    out = []
    for i in range(n):
        a, b = names[i % len(names)], things[(i * 3) % len(things)]
        out.append(f"{a} had a {b}. {a} liked the {b} very much. It was day {i}. " + STORY)
    return out


def sentencepiece_tokenizer(folder: Path, vocab_size: int = 320):
    from toolkit.tokenizers.sentencepiece import train_sentencepiece

    return train_sentencepiece(corpus(), vocab_size, Path(folder), quiet=True)


def make_run(folder: Path, tok, *, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 0,
             max_seq_len: int = 64, tie: bool = True, chat_template: str = "", seed: int = 0,
             train_steps: int = 0, hidden_dim: int = 0) -> Path:
    """A run folder (model.safetensors, recipe.toml, tokenizer/, run.json) for a tiny llama with random weights,
    optionally fitted for `train_steps` steps on the test corpus so that greedy text is not degenerate."""
    from toolkit import models
    from toolkit import recipe as recipe_lib
    from toolkit.run import save_weights, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"name": "tiny", "model": {"family": "llama", "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
                                     "n_kv_heads": n_kv_heads, "max_seq_len": max_seq_len,
                                     "vocab_size": tok.vocab_size, "tie_embeddings": tie, "hidden_dim": hidden_dim},
           "tokenizer": {"kind": "bytes" if tok.kind == "bytes" else "sentencepiece", "path": str(folder / "tokenizer"),
                         "vocab_size": tok.vocab_size}}
    if chat_template:
        raw["data"] = {"chat_template": chat_template}
    recipe = recipe_lib.from_dict(raw, "test")
    torch.manual_seed(seed)
    model = models.build(recipe.model, tok.vocab_size)
    if train_steps:
        fit(model, tok, train_steps, max_seq_len)
    tok.save(folder / "tokenizer")
    save_weights(model, folder / "model.safetensors", step=train_steps)
    recipe_lib.save(recipe, folder / "recipe.toml")
    write_json(folder / "run.json", {"test": True})
    return folder


def fit(model, tok, steps: int, seq_len: int) -> None:
    ids = []
    for line in corpus():
        ids += [tok.bos_id] + tok.encode(line)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (8,), generator=g)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
