import struct

import pytest

from toolkit import tokenizers
from toolkit.data import iter_documents
from toolkit.errors import UserError
from toolkit.recipe import TokenizerConfig
from toolkit.tokenizers.bytes import BytesTokenizer
from toolkit.tokenizers.llama2c_bin import read_tokenizer_bin, write_tokenizer_bin
from toolkit.tokenizers.tiktoken import TiktokenTokenizer


def test_sentencepiece_llama2c_layout_and_round_trip(sp_tokenizer_dir):
    tok = tokenizers.load(sp_tokenizer_dir)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400
    assert (tok.sp.id_to_piece(0), tok.bos_id, tok.eos_id) == ("<unk>", 1, 2)
    assert tok.sp.id_to_piece(3) == "<0x00>" and tok.sp.id_to_piece(258) == "<0xFF>"  # byte fallback at byte + 3
    text = "The cat saw 1234 ships — ünïcödé!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(3 <= i <= 258 for i in ids)  # unseen characters fall back to bytes
    assert [str(d) for d in "1234"] == [tok.sp.id_to_piece(i).strip("▁") for i in tok.encode("1234")][-4:]  # digits split
    assert tok.encode_batch(["a cat", "the dog"]) == [tok.encode("a cat"), tok.encode("the dog")]


def test_fingerprint_is_stable_and_changes_with_the_mapping(tmp_path, sp_tokenizer_dir, corpus_dir):
    tok = tokenizers.load(sp_tokenizer_dir)
    tok.save(tmp_path / "copy")
    assert tokenizers.load(tmp_path / "copy").fingerprint == tok.fingerprint
    other = tokenizers.build(TokenizerConfig(kind="sentencepiece", vocab_size=380),
                             iter_documents(corpus_dir, "train"), tmp_path / "other", quiet=True)
    assert other.fingerprint != tok.fingerprint
    assert BytesTokenizer(10).fingerprint != BytesTokenizer(20).fingerprint


def test_tokenizer_bin_round_trip_matches_llama2c_export(sp_tokenizer_dir, tmp_path):
    tok = tokenizers.load(sp_tokenizer_dir)
    pieces, scores, max_len = read_tokenizer_bin(sp_tokenizer_dir / "tokenizer.bin", tok.vocab_size)
    assert pieces[1] == b"\n<s>\n" and pieces[2] == b"\n</s>\n"
    for i in range(tok.vocab_size):
        if i not in (1, 2):
            assert pieces[i] == tok.sp.id_to_piece(i).replace("▁", " ").encode()
        assert scores[i] == pytest.approx(tok.sp.get_score(i))
    assert max_len == max(len(p) for p in pieces)
    # an independent read of the first entries, straight from the layout in llama2.c's tokenizer.py
    raw = (sp_tokenizer_dir / "tokenizer.bin").read_bytes()
    assert struct.unpack_from("<I", raw, 0)[0] == max_len
    score0, len0 = struct.unpack_from("<fI", raw, 4)
    assert raw[12 : 12 + len0] == b"<unk>" and score0 == pytest.approx(tok.sp.get_score(0))
    write_tokenizer_bin(tmp_path / "t.bin", list(zip([p.decode() for p in pieces], scores)), None, None)
    assert read_tokenizer_bin(tmp_path / "t.bin", tok.vocab_size)[0] == pieces
    with pytest.raises(UserError, match="truncated"):
        read_tokenizer_bin(sp_tokenizer_dir / "tokenizer.bin", tok.vocab_size + 5)


def test_sentencepiece_too_large_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"could not train a 5000-token vocabulary.*at most \d+"):
        tokenizers.build(TokenizerConfig(kind="sentencepiece", vocab_size=5000), ["tiny corpus only"], tmp_path / "t",
                         quiet=True)


def test_tiktoken_gpt2_offline_from_packaged_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))  # empty cache: must seed from the package
    tok = TiktokenTokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.bos_id == tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode("Once upon a time, there was a cat.")) == "Once upon a time, there was a cat."
    tok.save(tmp_path / "t")
    assert tokenizers.load(tmp_path / "t").fingerprint == tok.fingerprint


def test_tiktoken_fold_cap_is_explicit():
    tok = TiktokenTokenizer("gpt2", vocab_cap=8192, cap_policy="fold")
    assert tok.vocab_size == 8192 and tok.bos_id is None  # <|endoftext|> has no id of its own under the fold
    assert tok.encode("Hello world") == [15496 % 8192, 995]
    assert tok.fingerprint != TiktokenTokenizer("gpt2").fingerprint
    with pytest.raises(UserError, match="cap_policy 'fold'"):
        TiktokenTokenizer("gpt2", vocab_cap=8192, cap_policy="none")
    with pytest.raises(UserError, match="unknown tiktoken encoding"):
        TiktokenTokenizer("gpt5")


def test_bytes_tokenizer():
    tok = BytesTokenizer(n_sentinels=4)
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode())
    assert tok.decode(ids + [tok.eos_id, tok.sentinel(0)]) == "héllo"
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.sentinel(3), tok.vocab_size) == (256, 257, 258, 262, 263)
    with pytest.raises(IndexError):
        tok.sentinel(4)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not a tokenizer folder"):
        tokenizers.load(tmp_path)


def test_tiktoken_drop_cap_leaves_out_ids_over_the_cap():
    """The older ts-llm tokenizer's cap: ids >= cap are left out of the text, the rest are GPT-2's own ids."""
    full = TiktokenTokenizer("gpt2")
    drop = TiktokenTokenizer("gpt2", vocab_cap=8192, cap_policy="drop")
    text = "Hello world, the quick brown fox jumps over the lazy dog."
    ids = full.encode(text)
    assert any(i >= 8192 for i in ids)
    assert drop.encode(text) == [i for i in ids if i < 8192]
    assert drop.encode_batch([text, "a"]) == [drop.encode(text), drop.encode("a")]
    assert drop.vocab_size == 8192 and drop.bos_id is None
    assert drop.fingerprint not in (full.fingerprint, TiktokenTokenizer("gpt2", 8192, "fold").fingerprint)
