import json

import numpy as np
import torch

from toolkit import recipe as recipe_lib
from toolkit import run as run_lib
from toolkit import tokenizers
from toolkit.data.chat_template import encode_conversation
from toolkit.shards.format import ShardSet
from toolkit.shards.pretokenize import pretokenize_conversations
from toolkit.shards.sampler import BatchSampler, eval_windows
from toolkit.tokenizers.bytes import BytesTokenizer
from toolkit.train.loop import train

CONVS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"It is {a + b}."}]
    for a in range(12) for b in range(3)
]


def write_convs(path):
    with open(path, "w") as f:
        for i, c in enumerate(CONVS):  # both line formats
            f.write(json.dumps(c if i % 2 else {"messages": c}) + "\n")
    return path


def test_conversation_shards_mask_exactly_the_assistant_tokens(tmp_path):
    tok = BytesTokenizer(0)
    tok.save(tmp_path / "tok")
    meta = pretokenize_conversations(write_convs(tmp_path / "c.jsonl"), tmp_path / "tok", tmp_path / "s", "llama2")
    assert meta["loss_mask"] and meta["documents"] == {"train": 33, "val": 3}
    shards = ShardSet(tmp_path / "s")
    ids, mask = [], []
    for c in [c for i, c in enumerate(CONVS) if i % 10 != 9][:3]:
        a, b = encode_conversation(tok, c, "llama2")
        ids, mask = ids + a, mask + b
    np.testing.assert_array_equal(shards.splits["train"][0][: len(ids)], ids)
    np.testing.assert_array_equal(shards.masks["train"][0][: len(mask)], mask)
    # what the trainer sees: targets are -1 except on the assistant's answer and its EOS
    sampler = BatchSampler(shards, "train", 16, 8, seed=0)
    which, offsets = sampler.draw()
    x, y = sampler.read(which, offsets)
    full = np.asarray(shards.splits["train"][0]).astype(np.int64)
    full_mask = np.asarray(shards.masks["train"][0])
    for row, off in enumerate(offsets):
        expect = np.where(full_mask[off + 1 : off + 17] == 1, full[off + 1 : off + 17], -1)
        np.testing.assert_array_equal(y[row], expect)
    answer = tok.encode("It is 5.") + [tok.eos_id]
    targets = [t for _, yb in eval_windows(shards, "val", 16, 4, 100) for t in yb.ravel() if t >= 0]
    assert all(0 <= t < 256 or t == tok.eos_id for t in targets)  # no prompt bytes, no BOS among the targets
    assert set(answer[:3]) <= set(targets)


def test_sft_fine_tunes_from_a_base_run_with_its_tokenizer(tiny_recipe, tmp_path):
    base = tmp_path / "base"
    train(recipe_lib.load(tiny_recipe, ["train.max_iters=4"]), base)
    convs = write_convs(tmp_path / "c.jsonl")
    r = recipe_lib.load("inner_arianna_sft", [
        f"data.source={convs}", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "model.max_seq_len=32", "train.device=cpu", "train.dtype=float32",
        "train.batch_size=4", "train.grad_accum=1", "train.max_iters=30", "train.lr=3e-3", "train.warmup_iters=2",
        "train.eval_interval=30", "train.eval_iters=4"])
    summary = train(r, tmp_path / "sft", init_from=base)
    run = run_lib.load_run(tmp_path / "sft")
    assert run.recipe.data.chat_template == "llama2"
    assert run.tokenizer.fingerprint == tokenizers.load(base / "tokenizer").fingerprint
    info = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert info["init_from"] == str(base)
    base_run = run_lib.load_run(base)
    before = dict(base_run.model.named_parameters())["tok_embeddings.weight"]
    after = dict(run.model.named_parameters())["tok_embeddings.weight"]
    assert not torch.equal(before, after)
    from toolkit.evaluate import evaluate

    before_sft = evaluate(base_run.model, ShardSet(info["data"]["shards"]), "val", 32, 4, 4, "cpu").loss
    assert summary["val_loss"] < before_sft - 1.0  # it learned the answers
