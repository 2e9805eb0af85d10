"""The audio tokenizer's layouts, and `lmkit pretokenize` over a folder of code files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import lmkit

from toolkit import tokenizers
from toolkit.audio.codes import CodeFile, save_codes
from toolkit.errors import UserError
from toolkit.recipe import TokenizerConfig, build_table
from toolkit.shards.format import open_shard
from toolkit.tokenizers.audio import AudioTokenizer


def random_codes(k=8, t=50, seed=0):
    return np.random.default_rng(seed).integers(0, 1024, (k, t)).astype(np.int16)


def test_layouts_round_trip_exactly():
    codes = random_codes()
    for layout in ("codebook0", "flatten", "delay"):
        tok = AudioTokenizer(layout, 8)
        ids = tok.encode_codes(codes)
        back = tok.decode_codes(ids)
        np.testing.assert_array_equal(back, codes[:1] if layout == "codebook0" else codes)
        assert back.dtype == np.int16 and ids.max() < tok.vocab_size
        np.testing.assert_array_equal(tok.decode_codes(list(ids)), back)  # lists work too
    four = AudioTokenizer("delay", 4)
    np.testing.assert_array_equal(four.decode_codes(four.encode_codes(codes)), codes[:4])  # extra codebooks dropped
    np.testing.assert_array_equal(four.decode_codes(four.encode_codes(codes[:, :0])), codes[:4, :0])


def test_layouts_put_codes_where_the_docs_say():
    codes = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int16)
    np.testing.assert_array_equal(AudioTokenizer("codebook0").encode_codes(codes), [1, 2, 3, 4])
    flat = AudioTokenizer("flatten", 3, codebook_size=100)
    np.testing.assert_array_equal(flat.encode_codes(codes), [1, 105, 209, 2, 106, 210, 3, 107, 211, 4, 108, 212])
    # MusicGen's docstring example, K=3, T=4: [[1,2,3,4,S,S],[S,1,2,3,4,S],[S,S,1,2,3,4]] read step by step
    delay = AudioTokenizer("delay", 3, codebook_size=100)
    P = delay.pad_id
    assert P == 300
    np.testing.assert_array_equal(delay.encode_codes(codes), [1, P, P, 2, 105, P, 3, 106, 209, 4, 107, 210,
                                                              P, 108, 211, P, P, 212])


def test_specials_match_the_seed_and_save_load(tmp_path):
    tok = AudioTokenizer("codebook0", n_sentinels=1021)
    assert (tok.pad_id, tok.eos_id, tok.sentinel(0), tok.vocab_size) == (1024, 1025, 1026, 2048)  # the seed's T5 ids
    assert tok.bos_id == 2047
    flat = AudioTokenizer("flatten", 8)
    assert (flat.pad_id, flat.eos_id, flat.sentinel_start, flat.bos_id, flat.vocab_size) == (8192, 8193, 8194,
                                                                                             8294, 8295)
    fingerprints = {AudioTokenizer(layout, 8).fingerprint for layout in ("codebook0", "flatten", "delay")}
    assert len(fingerprints | {AudioTokenizer("flatten", 4).fingerprint}) == 4
    flat.save(tmp_path / "tok")
    again = tokenizers.load(tmp_path / "tok")
    assert isinstance(again, AudioTokenizer) and again.fingerprint == flat.fingerprint
    assert (again.layout, again.n_codebooks, again.vocab_size) == ("flatten", 8, 8295)
    cfg = build_table(TokenizerConfig, {"kind": "audio", "layout": "delay", "n_codebooks": 4}, "t")
    assert tokenizers.from_config(cfg).fingerprint == AudioTokenizer("delay", 4).fingerprint
    with pytest.raises(UserError, match=r"t.layout: expected one of 'codebook0', 'flatten', 'delay', got 'zigzag'"):
        build_table(TokenizerConfig, {"kind": "audio", "layout": "zigzag"}, "t")


def test_generated_streams_and_bad_streams():
    tok = AudioTokenizer("flatten", 2, codebook_size=10)
    ids = [tok.bos_id, 3, 14, 5, 16, tok.sentinel(3), tok.eos_id]
    np.testing.assert_array_equal(tok.decode_codes(ids), [[3, 5], [4, 6]])  # specials dropped
    with pytest.raises(UserError, match="id 3 at step 1 is not a code of codebook 1"):
        tok.decode_codes([3, 14, 5, 3])
    with pytest.raises(UserError, match="3 is not a multiple of 2 codebooks"):
        tok.decode_codes([3, 14, 5])
    with pytest.raises(UserError, match="encodes EnCodec codes, not text: use encode_codes"):
        tok.encode("hello")
    with pytest.raises(UserError, match="codes outside 0..9"):
        tok.encode_codes(np.array([[1, 10], [2, 3]]))
    with pytest.raises(UserError, match="too few codebooks"):
        AudioTokenizer("flatten", 8).encode_codes(random_codes(4))
    assert tok.decode([3, 14, tok.pad_id, tok.sentinel(1), tok.bos_id]) == "0:3 1:4 <pad> <s_1> <bos>"


def _write_codes(folder, n_files, frames=300):
    folder.mkdir()
    for i in range(n_files):
        codes = random_codes(8, frames + 10 * i, seed=i)
        save_codes(folder / f"song{i}.npz", CodeFile(codes=codes, sample_rate=24000, frame_rate=75.0, bandwidth=6.0,
                                                      num_samples=codes.shape[1] * 320, codec="c", source=f"{i}.wav",
                                                      sha256=f"{i:064d}"))


def test_pretokenize_codes_folder(capsys, tmp_path, corpus_dir, sp_tokenizer_dir):
    codes_dir = tmp_path / "codes"
    _write_codes(codes_dir, 5)
    code, _, err = lmkit(capsys, "-q", "vocab", "-o", str(tmp_path / "tok"), "--kind", "audio", "--layout", "delay",
                         "--n-codebooks", "4")
    assert code == 0, err
    tok = tokenizers.load(tmp_path / "tok")
    code, _, err = lmkit(capsys, "-q", "pretokenize", str(codes_dir), "--tokenizer", str(tmp_path / "tok"), "-o",
                         str(tmp_path / "shards"), "--append-eos")
    assert code == 0, err
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["documents"]["train"] == 4 and meta["documents"]["val"] == 1
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"
    from toolkit.audio.codes import load_codes
    from toolkit.shards.audio import split_files

    splits = split_files(sorted(codes_dir.glob("*.npz")), 0.1)
    for split in ("train", "val"):
        got = np.concatenate([open_shard(tmp_path / "shards" / name) for name in meta["shards"][split]])
        want = np.concatenate([np.concatenate([[tok.bos_id], tok.encode_codes(load_codes(p).codes), [tok.eos_id]])
                               for p in splits[split]])
        np.testing.assert_array_equal(got, want)
        assert meta["tokens"][split] == len(want)
    # the same keys as the text path writes
    code, _, err = lmkit(capsys, "-q", "pretokenize", str(corpus_dir), "--tokenizer", str(sp_tokenizer_dir), "-o",
                         str(tmp_path / "text_shards"), "--workers", "1")
    assert code == 0, err
    text_meta = json.loads((tmp_path / "text_shards" / "meta.json").read_text())
    assert set(text_meta) <= set(meta)
    code, _, err = lmkit(capsys, "pretokenize", str(codes_dir), "--tokenizer", str(tmp_path / "tok"), "-o",
                         str(tmp_path / "shards"))
    assert code == 1 and "already holds shards" in err
    code, _, err = lmkit(capsys, "pretokenize", str(codes_dir), "--tokenizer", str(sp_tokenizer_dir), "-o",
                         str(tmp_path / "other"))
    assert code == 1 and "is a sentencepiece tokenizer; make an audio one" in err


def test_pretokenize_one_file_splits_by_time(tmp_path):
    from toolkit.shards.audio import pretokenize_codes

    _write_codes(tmp_path / "one", 1, frames=200)
    AudioTokenizer("codebook0").save(tmp_path / "tok")
    result = pretokenize_codes(tmp_path / "one", tmp_path / "tok", tmp_path / "shards", shard_tokens=1024)
    assert result.tokens == {"train": 1 + 180, "val": 1 + 20}
    val = open_shard(tmp_path / "shards" / "val_000000.bin")
    np.testing.assert_array_equal(val[1:], random_codes(8, 200, seed=0)[0, 180:])
