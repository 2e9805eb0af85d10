import json

import numpy as np
import pytest

from toolkit import tokenizers
from toolkit.data import iter_documents
from toolkit.errors import UserError
from toolkit.shards.format import MAGIC, ShardSet, open_shard, write_shard
from toolkit.shards.pretokenize import convert_llama2c, pretokenize
from toolkit.shards.sampler import BatchSampler, eval_windows
from toolkit.tokenizers.bytes import BytesTokenizer


def expected_tokens(tok, corpus_dir, split):
    out = []
    for doc in iter_documents(corpus_dir, split):
        out += [tok.bos_id] + tok.encode(doc)
    return np.array(out)


def test_pretokenize_header_and_tokens_equal_the_tokenizer(tmp_path, corpus_dir, sp_tokenizer_dir):
    res = pretokenize(corpus_dir, sp_tokenizer_dir, tmp_path / "s", shard_tokens=20_000, workers=2)
    tok = tokenizers.load(sp_tokenizer_dir)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"
    assert meta["doc_prefix_id"] == 1 and meta["documents"] == {"train": 270, "val": 30}
    for split in ("train", "val"):
        files = sorted((tmp_path / "s").glob(f"{split}_*.bin"))
        assert [f.name for f in files] == meta["shards"][split]
        raw = [np.fromfile(f, dtype=np.int32, count=256) for f in files]
        assert all(h[0] == MAGIC and h[1] == 1 for h in raw)
        assert all(h[2] <= 20_000 for h in raw) and sum(h[2] for h in raw) == meta["tokens"][split]
        got = np.concatenate([np.fromfile(f, dtype=np.uint16, offset=1024) for f in files])
        np.testing.assert_array_equal(got, expected_tokens(tok, corpus_dir, split))
    assert len(meta["shards"]["train"]) > 1  # the shard size option rolls over
    single = pretokenize(corpus_dir, sp_tokenizer_dir, tmp_path / "one", shard_tokens=20_000, workers=1)
    assert single.tokens == res.tokens
    with pytest.raises(UserError, match="already holds shards"):
        pretokenize(corpus_dir, sp_tokenizer_dir, tmp_path / "s")


def test_uint32_shards_for_large_vocabularies(tmp_path, corpus_dir):
    from toolkit.tokenizers.tiktoken import TiktokenTokenizer

    tok = TiktokenTokenizer("cl100k_base")
    tok.save(tmp_path / "tok")
    pretokenize(corpus_dir, tmp_path / "tok", tmp_path / "s", workers=1)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["doc_prefix_id"] == 100257
    arr = open_shard(tmp_path / "s" / "val_000000.bin")
    assert arr.dtype == np.uint32
    np.testing.assert_array_equal(arr, expected_tokens(tok, corpus_dir, "val"))


def test_truncated_shard_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(100, dtype=np.uint16))
    data = (tmp_path / "train_000000.bin").read_bytes()
    (tmp_path / "train_000000.bin").write_bytes(data[:-10])
    with pytest.raises(UserError, match="header says 100 tokens"):
        open_shard(tmp_path / "train_000000.bin")


def test_llama2c_headerless_bins_are_read_and_converted(tmp_path):
    src = tmp_path / "tok512"
    src.mkdir()
    for i in range(3):
        np.arange(i * 1000, i * 1000 + 600, dtype=np.uint16).tofile(src / f"data{i:02d}.bin")
    s = ShardSet(src)
    np.testing.assert_array_equal(s.splits["val"][0], np.arange(0, 600))  # first file is val, as llama2.c
    assert s.tokens("train") == 1200
    meta = convert_llama2c(src, tmp_path / "out", 4096, None)
    assert meta["tokens"] == {"train": 1200, "val": 600}
    np.testing.assert_array_equal(open_shard(tmp_path / "out" / "train_000001.bin"), np.arange(2000, 2600))


def test_sampler_is_deterministic_and_resumable(tmp_path, corpus_dir, sp_tokenizer_dir):
    pretokenize(corpus_dir, sp_tokenizer_dir, tmp_path / "s", workers=1)
    shards = ShardSet(tmp_path / "s")
    a = BatchSampler(shards, "train", 32, 4, seed=7)
    b = BatchSampler(shards, "train", 32, 4, seed=7)
    x1, y1 = a.next_batch()
    state = a.state()
    x2, _ = a.next_batch()
    b.next_batch()
    np.testing.assert_array_equal(b.next_batch()[0], x2)
    c = BatchSampler(shards, "train", 32, 4, seed=0)
    c.set_state(state)
    np.testing.assert_array_equal(c.next_batch()[0], x2)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    windows = list(eval_windows(shards, "val", 32, 4, max_batches=3))
    assert len(windows) == 3 and windows[0][0].shape == (4, 32)
    val = np.asarray(shards.splits["val"][0])
    np.testing.assert_array_equal(windows[1][0][0], val[128:160])  # non-overlapping, from the start


def test_fingerprint_mismatch_is_refused(tmp_path, corpus_dir, sp_tokenizer_dir):
    pretokenize(corpus_dir, sp_tokenizer_dir, tmp_path / "s", workers=1)
    with pytest.raises(UserError, match="made with a different tokenizer"):
        ShardSet(tmp_path / "s").check_tokenizer(BytesTokenizer())


def test_a_folded_vocabulary_joins_documents_with_no_stray_token(tmp_path):
    """gpt2 folded to 8192 ids (the attractor recipes): <|endoftext|> would fold onto " support" (50256 % 8192 =
    1104), a word the text never had; the folded tokenizer has no BOS/EOS, and the shards decode to the text."""
    from toolkit.data import iter_documents, write_corpus
    from toolkit.tokenizers.tiktoken import TiktokenTokenizer

    docs = ["The cat sat on the mat.", "A dog ran to the sea.", "It was a big red sun."] * 20
    write_corpus(docs, tmp_path / "c", val_fraction=0.1, source="test")
    tok = TiktokenTokenizer("gpt2", vocab_cap=8192, cap_policy="fold")
    assert tok.bos_id is None and tok.eos_id is None
    assert all(i < 8192 for d in docs for i in tok.encode(d))  # these words are below the cap: decoding is exact
    tok.save(tmp_path / "tok")
    pretokenize(tmp_path / "c", tmp_path / "tok", tmp_path / "s", workers=1)
    train = np.concatenate([open_shard(p) for p in sorted((tmp_path / "s").glob("train_*.bin"))])
    assert 1104 not in train.tolist()
    assert tok.decode(train.tolist()) == "".join(iter_documents(tmp_path / "c", "train"))
    unfolded = TiktokenTokenizer("gpt2")
    assert unfolded.bos_id == unfolded.eos_id == 50256  # an unfolded gpt2 keeps <|endoftext|> between documents
