"""Fuzz every reader of an outside file: random, cut and tampered inputs.

The property, for every reader: it returns a correct result (an uncut valid file reads back equal; any result
has the shape its header says) or raises UserError with a one-line message. Any other exception, or a result
of the wrong shape, fails. Examples are few and small (derandomized, so CI is reproducible); the number of
cases tried per reader is printed at the end of the module.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.errors import UserError

COUNTS: collections.Counter = collections.Counter()  # cases tried, by reader
READ: collections.Counter = collections.Counter()  # of those, cases that returned a result
_names = itertools.count()


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def attempt(reader: str, fn, *args, **kwargs):
    """(True, result) or (False, None) for a one-line UserError; anything else propagates and fails the test."""
    COUNTS[reader] += 1
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, f"{reader}: UserError message is not one line: {msg!r}"
        return False, None
    READ[reader] += 1
    return True, result


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    width = max((len(k) for k in COUNTS), default=0)
    lines = [f"  {k:<{width}}  {v:5d} tried, {READ[k]:5d} read, {v - READ[k]:5d} refused (UserError)"
             for k, v in sorted(COUNTS.items())]
    print(f"\nfuzz cases per reader ({sum(COUNTS.values())} in all):\n" + "\n".join(lines), file=sys.__stderr__)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def fresh(work: Path, name: str) -> Path:
    """A new path per example (a memory map of an earlier example's file is never truncated under it)."""
    folder = work / f"case{next(_names)}"
    folder.mkdir()
    return folder / name


def mutate(data: bytes, how: tuple) -> bytes:
    kind = how[0]
    if kind == "cut":
        return data[: how[1] % (len(data) + 1)]
    if kind == "flip":
        if not data:
            return data
        pos = how[1] % len(data)
        return data[:pos] + bytes([data[pos] ^ (how[2] or 1)]) + data[pos + 1 :]
    if kind == "append":
        return data + how[1]
    if kind == "replace":
        return how[1]
    raise AssertionError(kind)


MUTATIONS = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("replace"), st.binary(max_size=64)),
)

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                           max_leaves=6)


# ---------------------------------------------------------------------------------------------------------
# shards (llm.c header + tokens, or headerless uint16) and the shard folder's meta.json


def check_shard(path: Path, arr) -> None:
    """A returned shard must be exactly what the file's header (or its absence) says."""
    from toolkit.shards.format import HEADER_BYTES, VERSION_DTYPE, read_header

    data = path.read_bytes()
    header = read_header(path)
    if header is None:
        assert arr.dtype == np.uint16 and arr.nbytes == len(data)
        np.testing.assert_array_equal(arr, np.frombuffer(data, dtype=np.uint16))
    else:
        version, count = header
        assert arr.dtype == VERSION_DTYPE[version] and arr.shape == (count,)
        assert HEADER_BYTES + arr.nbytes == len(data)
        np.testing.assert_array_equal(arr, np.frombuffer(data, dtype=arr.dtype, offset=HEADER_BYTES))


def shard_header_bytes(version: int, count: int) -> bytes:
    from toolkit.shards.format import HEADER_INTS, MAGIC

    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, version, count
    return header.tobytes()


@fuzz(120)
@given(data=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda v, c, tail: shard_header_bytes(v, c) + tail, st.sampled_from([0, 1, 2, 3, -1]),
              st.integers(-(2**31), 2**31 - 1) | st.integers(0, 40), st.binary(max_size=80))))
def test_open_shard_random(work, data):
    from toolkit.shards.format import open_shard

    path = fresh(work, "x.bin")
    path.write_bytes(data)
    ok, arr = attempt("shards.open_shard", open_shard, path)
    if ok:
        check_shard(path, arr)


@fuzz(150)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40), wide=st.booleans(), how=st.one_of(
    MUTATIONS, st.tuples(st.just("header"), st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("header"), st.integers(0, 2), st.integers(-3, 50)), st.just(("none",))))
def test_open_shard_tampered(work, tokens, wide, how):
    from toolkit.shards.format import open_shard, write_shard

    tokens = np.array(tokens, dtype=np.uint64) % (2**32 if wide else 2**16)
    tokens = tokens.astype(np.uint32 if wide else np.uint16)
    path = fresh(work, "train_000000.bin")
    write_shard(path, tokens)
    original = path.read_bytes()
    if how[0] == "header":
        head = np.frombuffer(original[:1024], dtype=np.int32).copy()
        head[how[1]] = how[2]
        path.write_bytes(head.tobytes() + original[1024:])
    elif how[0] != "none":
        path.write_bytes(mutate(original, how))
    ok, arr = attempt("shards.open_shard", open_shard, path)
    if ok:
        check_shard(path, arr)
    if path.read_bytes()[:12] == original[:12] and len(path.read_bytes()) == len(original):
        assert ok, "an intact header over a whole file must read"
        if path.read_bytes() == original:
            np.testing.assert_array_equal(arr, tokens)


def write_shard_folder(folder: Path, masks: bool = False) -> dict:
    from toolkit.shards.format import shard_meta, write_meta, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = {"train": ["train_000000.bin", "train_000001.bin"], "val": ["val_000000.bin"]}
    sizes = {"train_000000.bin": 30, "train_000001.bin": 20, "val_000000.bin": 10}
    for name, n in sizes.items():
        write_shard(folder / name, rng.integers(0, 259, n).astype(np.uint16))
        if masks:
            (folder / name).with_suffix(".mask").write_bytes(bytes(rng.integers(0, 2, n).astype(np.uint8)))
    meta = shard_meta({"kind": "bytes", "fingerprint": "0123456789abcdef", "vocab_size": 259}, np.uint16,
                      {"train": 50, "val": 10}, shards, **({"loss_mask": True} if masks else {}))
    write_meta(folder, meta)
    return meta


def check_shard_set(ss) -> None:
    for split in ("train", "val"):
        arrays = ss.splits[split]
        assert isinstance(arrays, list) and arrays and all(isinstance(a, np.ndarray) and a.ndim == 1 for a in arrays)
        assert ss.tokens(split) > 0
        if ss.masks is not None:
            assert [len(m) for m in ss.masks[split]] == [len(a) for a in arrays]
    assert isinstance(ss.fingerprint, str)


META_KEYS = ["shards", "shards.train", "shards.val", "shards.train.0", "tokenizer", "tokenizer.fingerprint",
             "loss_mask", "tokens", "vocab_size", "dtype", "format"]


def set_key(meta, dotted: str, value):
    """Set meta[a][b][c] = value where the path exists (lists by index); False where it does not."""
    *parents, last = dotted.split(".")
    node = meta
    for p in parents:
        if isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            return False
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return False
    return True


@fuzz(120)
@given(masks=st.booleans(), key=st.sampled_from(META_KEYS), value=JSON_VALUES | st.sampled_from(
    ["missing.bin", "../x.bin", "", ".", "val_000000.bin", "train_000000.mask"]),
       raw=st.none() | st.binary(max_size=40), drop_mask=st.booleans())
def test_shard_set_meta(work, masks, key, value, raw, drop_mask):
    from toolkit.shards.format import ShardSet

    folder = fresh(work, "shards")
    meta = write_shard_folder(folder, masks)
    if raw is not None:
        (folder / "meta.json").write_bytes(raw)
    elif set_key(meta, key, value):
        (folder / "meta.json").write_text(json.dumps(meta))
    if masks and drop_mask:
        (folder / "train_000001.mask").write_bytes(b"\x01" * 7)
    ok, ss = attempt("shards.ShardSet(meta.json)", ShardSet, folder)
    if ok:
        check_shard_set(ss)


@fuzz(60)
@given(files=st.dictionaries(st.sampled_from(["train_000000.bin", "val_000000.bin", "data00.bin", "data01.bin"]),
                             st.binary(max_size=40), min_size=1, max_size=3))
def test_shard_set_headerless(work, files):
    from toolkit.shards.format import ShardSet

    folder = fresh(work, "shards")
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    ok, ss = attempt("shards.ShardSet(no meta)", ShardSet, folder)
    if ok:
        check_shard_set(ss)


# ---------------------------------------------------------------------------------------------------------
# llama2.c model.bin v0 / v1 / v2 and tokenizer.bin


@pytest.fixture(scope="module")
def model_bins(tmp_path_factory):
    """Valid tiny model.bin files: (bytes, header, tensors as written) for v0 (shared and not), v1, v2."""
    from toolkit import models
    from toolkit.export import llama2c
    from toolkit.models.llama import Config

    folder = tmp_path_factory.mktemp("bins")
    out = {}
    for name, version, tie in [("v0", 0, True), ("v0_untied", 0, False), ("v1", 1, False), ("v2", 2, True)]:
        torch.manual_seed(0)
        model = models.build(Config(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=11, max_seq_len=4,
                                    multiple_of=16, tie_embeddings=tie))
        path = folder / f"{name}.bin"
        h = llama2c.export_model(model, path, version)
        out[name] = (path.read_bytes(), h, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def check_bin(result, original_header=None, original=None) -> None:
    from toolkit.export import llama2c

    h, tensors = result
    shapes = llama2c._shapes(h)
    assert set(tensors) == set(shapes)
    for k, t in tensors.items():
        assert tuple(t.shape) == shapes[k] and t.dtype == np.float32
    if original is not None:
        assert h == original_header
        for k, t in tensors.items():
            atol = 0.02 if h.version == 2 else 0.0
            torch.testing.assert_close(torch.from_numpy(t), original[k], atol=atol, rtol=0)


@fuzz(120)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda ints, tail: struct.pack("<7i", *ints) + tail,
              st.lists(st.integers(-3, 40), min_size=7, max_size=7), st.binary(max_size=200)),
    st.builds(lambda v, ints, shared, gs, tail: struct.pack("<Ii7iBi", 0x616B3432, v, *ints, shared, gs).ljust(256, b"\0")
              + tail, st.integers(-1, 3), st.lists(st.integers(-3, 40), min_size=7, max_size=7), st.integers(0, 255),
              st.integers(-3, 40), st.binary(max_size=200))))
def test_read_bin_random(work, data):
    from toolkit.export import llama2c

    path = fresh(work, "model.bin")
    path.write_bytes(data)
    ok, result = attempt("export.llama2c.read_bin", llama2c.read_bin, path)
    if ok:
        check_bin(result)


@fuzz(150)
@given(name=st.sampled_from(["v0", "v0_untied", "v1", "v2"]), how=st.one_of(
    MUTATIONS, st.tuples(st.just("flip"), st.integers(0, 40), st.integers(0, 255)), st.just(("none",))))
def test_read_bin_cut_or_tampered(work, model_bins, name, how):
    from toolkit.export import llama2c

    original, header, tensors = model_bins[name]
    data = original if how[0] == "none" else mutate(original, how)
    path = fresh(work, "model.bin")
    path.write_bytes(data)
    ok, result = attempt("export.llama2c.read_bin", llama2c.read_bin, path)
    if len(data) != len(original):
        assert not ok, "a model.bin cut or grown must be refused"
    if data == original:
        assert ok
        check_bin(result, header, tensors)
    elif ok:
        check_bin(result)


def tokenizer_pieces():
    return st.lists(st.tuples(st.text(max_size=5), st.floats(width=32, allow_nan=False)), min_size=1, max_size=12)


@fuzz(100)
@given(pieces=tokenizer_pieces(), how=MUTATIONS | st.just(("none",)), vocab=st.integers(0, 14))
def test_read_tokenizer_bin(work, pieces, how, vocab):
    from toolkit.tokenizers.llama2c_bin import _surface, read_tokenizer_bin, write_tokenizer_bin

    path = fresh(work, "tokenizer.bin")
    write_tokenizer_bin(path, pieces, None, None)
    original = path.read_bytes()
    data = original if how[0] == "none" else mutate(original, how)
    path.write_bytes(data)
    n = len(pieces) if how[0] != "replace" else vocab
    ok, result = attempt("tokenizers.read_tokenizer_bin", read_tokenizer_bin, path, n)
    if ok:
        got, scores, max_len = result
        assert len(got) == len(scores) == n and all(isinstance(p, bytes) and len(p) <= max_len for p in got)
    if data == original:
        assert ok and got == [_surface(p, i, None, None) for i, (p, _) in enumerate(pieces)]
        assert scores == [s for _, s in pieces]
    elif len(data) < len(original) and how[0] == "cut":
        assert not ok, "a cut tokenizer.bin must be refused"


@fuzz(40)
@given(data=st.binary(max_size=200) | st.builds(lambda head, tail: struct.pack("<I", head) + tail,
                                                   st.integers(0, 8), st.binary(max_size=300)),
       vocab=st.integers(0, 300))
def test_llama2c_tokenizer_random(work, data, vocab):
    from toolkit.tokenizers.llama2c import Llama2cTokenizer

    path = fresh(work, "tokenizer.bin")
    path.write_bytes(data)
    ok, tok = attempt("tokenizers.Llama2cTokenizer.from_file", Llama2cTokenizer.from_file, path, vocab)
    if ok:
        assert tok.vocab_size == vocab >= 259


# ---------------------------------------------------------------------------------------------------------
# audio: code files (.npz) and audio files


def valid_codes():
    from toolkit.audio.codes import CodeFile

    codes = (np.arange(8 * 75).reshape(8, 75) % 1024).astype(np.int16)
    return CodeFile(codes=codes, sample_rate=24000, frame_rate=75.0, bandwidth=6.0, num_samples=24000,
                    codec="facebook/encodec_24khz", source="a.wav", sha256="ab" * 32, source_path="/x/a.wav")


CODE_KEYS = ["codes", "sample_rate", "frame_rate", "bandwidth", "num_samples", "duration", "codec", "source",
             "sha256", "source_path", "tokens", "target_bandwidth", "extra"]
NP_VALUES = st.one_of(
    st.integers(-(2**40), 2**40).map(np.int64), st.floats().map(np.float64), st.text(max_size=4).map(np.str_),
    st.booleans().map(np.bool_), st.just(np.zeros((0,), np.int16)), st.just(np.zeros((2, 3), np.float32)),
    st.just(np.full((8, 75), 40000, np.int32)), st.just(np.full((8, 75), -1, np.int64)),
    st.just(np.zeros((8, 74), np.int16)), st.just(np.zeros((8, 75), np.uint8)), st.just(np.zeros((1, 8, 75), np.int16)),
    st.just(np.array([1, 2], np.int64)), st.just(np.array(["a", "b"])), st.just(np.array(1 + 2j)),
    st.just(np.zeros((0, 75), np.int16)), st.just(np.zeros((8, 0), np.int16)),
    st.sampled_from([np.float64("nan"), np.float64("inf"), np.float64(2.5), np.int64(-5), np.int64(0)]), st.just(np.array(b"bytes")), st.just(np.array(float("inf"))),
    st.just(np.array(None, dtype=object)), st.just(np.array([{"a": 1}], dtype=object)),
)


def check_code_file(cf) -> None:
    from toolkit.audio.codes import CodeFile

    assert isinstance(cf, CodeFile)
    assert cf.codes.dtype == np.int16 and cf.codes.ndim == 2 and cf.n_codebooks >= 1
    assert cf.codes.size == 0 or (cf.codes.min() >= 0)
    assert isinstance(cf.sample_rate, int) and cf.sample_rate > 0
    assert isinstance(cf.frame_rate, float) and math.isfinite(cf.frame_rate) and cf.frame_rate > 0
    assert isinstance(cf.num_samples, int) and cf.num_samples >= 0 and math.isfinite(cf.bandwidth)
    assert all(isinstance(getattr(cf, k), str) for k in ("codec", "source", "sha256", "source_path"))
    assert abs(cf.frames - math.ceil(cf.num_samples * cf.frame_rate / cf.sample_rate)) <= 1


@fuzz(120)
@given(edits=st.dictionaries(st.sampled_from(CODE_KEYS), st.none() | NP_VALUES, max_size=2),
       compressed=st.booleans(), seed_style=st.booleans())
def test_load_codes_wrong_values(work, edits, compressed, seed_style):
    check_load_codes(work, edits, ("none",), compressed, seed_style)


@fuzz(100)
@given(how=MUTATIONS | st.tuples(st.just("cut"), st.integers(0, 3000)), compressed=st.booleans(),
       seed_style=st.booleans())
def test_load_codes_cut_or_tampered(work, how, compressed, seed_style):
    check_load_codes(work, {}, how, compressed, seed_style)


def check_load_codes(work, edits, how, compressed, seed_style):
    from toolkit.audio.codes import load_codes, save_codes

    cf = valid_codes()
    path = fresh(work, "a.npz")
    save_codes(path, cf)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if seed_style:
        arrays = {"tokens": arrays["codes"], "sample_rate": arrays["sample_rate"], "frame_rate": arrays["frame_rate"],
                  "target_bandwidth": arrays["bandwidth"]}
    for k, v in edits.items():
        if v is None:
            arrays.pop(k, None)
        else:
            arrays[k] = v
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    original = path.read_bytes()
    data = original if how[0] == "none" else mutate(original, how)
    path.write_bytes(data)
    ok, got = attempt("audio.codes.load_codes", load_codes, path)
    if ok:
        check_code_file(got)
    if not edits and data == original:
        assert ok
        np.testing.assert_array_equal(got.codes, cf.codes)
        assert got.sample_rate == cf.sample_rate and got.frame_rate == cf.frame_rate
        if not seed_style:
            fields = ("bandwidth", "num_samples", "codec", "source", "sha256", "source_path")
            assert [getattr(got, k) for k in fields] == [getattr(cf, k) for k in fields]


@fuzz(40)
@given(data=st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"PK\x03\x04" + b))
def test_load_codes_random(work, data):
    from toolkit.audio.codes import load_codes

    path = fresh(work, "a.npz")
    path.write_bytes(data)
    ok, got = attempt("audio.codes.load_codes", load_codes, path)
    if ok:
        check_code_file(got)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    import soundfile as sf

    folder = tmp_path_factory.mktemp("audio")
    t = np.arange(6000, dtype=np.float32)
    audio = (0.5 * np.sin(t / 7)).astype(np.float32)
    out = {}
    for ext in ("wav", "flac"):
        path = folder / f"a.{ext}"
        sf.write(str(path), audio, 8000, subtype="PCM_16")
        out[ext] = (path.read_bytes(), sf.read(str(path), dtype="float32")[0])
    return out


@fuzz(80)
@given(ext=st.sampled_from(["wav", "flac"]), how=st.tuples(st.just("cut"), st.integers(0, 20000)) | MUTATIONS,
       rate=st.sampled_from([8000, 16000]))
def test_read_audio_cut(work, audio_files, ext, how, rate):
    from toolkit.audio.io import read_audio

    original, decoded = audio_files[ext]
    data = mutate(original, how)
    path = fresh(work, f"a.{ext}")
    path.write_bytes(data)
    ok, audio = attempt("audio.io.read_audio", read_audio, path, rate)
    if ok:
        assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
    if data == original and rate == 8000:
        assert ok
        np.testing.assert_array_equal(audio, decoded)
    elif how[0] == "cut" and len(data) < len(original):
        assert not ok or len(audio) == len(decoded) * rate // 8000, f"a cut {ext} read {len(audio)} samples"


# ---------------------------------------------------------------------------------------------------------
# recipes


TOML_LINES = st.one_of(
    st.sampled_from(["[model]", "[train]", "[data]", "[tokenizer]", "[eval]", "[export]", "[[model]]", "[model.x]",
                     "family = \"llama\"", "family = \"nope\"", "family = 3", "family = [1]", "family = {a = 1}",
                     "name = 1", "name = \"n\"", "description = [1, 2]", "dim = 0", "n_heads = 0", "dim = 3",
                     "lr = nan", "lr = inf", "lr = -1", "max_iters = 1e400", "max_iters = 2e6", "kind = \"bytes\"",
                     "groups = 1", "groups = {a = 1}", "groups = {a = {lr = \"x\"}}", "seed = 99999999999999999999",
                     "batch_size = true", "x = ", "= 1", "\"", "\x00", "model = 1", "train = []"]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(["dim", "n_layers", "lr", "vocab_size", "kind", "source",
                                                          "max_iters", "dropout", "n_kv_heads", "family", "format"]),
              st.sampled_from(["0", "-1", "1.5", "\"a\"", "true", "[]", "{}", "nan", "-inf", "1e308", "2", "64"])),
    st.text(max_size=12),
)


def edit_lines(text: str, edits: list) -> str:
    lines = text.splitlines()
    for op, i, line in edits:
        i %= len(lines) + 1
        if op == "delete":
            del lines[i : i + 1]
        elif op == "replace":
            lines[i : i + 1] = [line]
        else:
            lines.insert(i, line)
    return "\n".join(lines)


def tiny_recipe_text() -> str:
    from conftest import TINY_RECIPE

    return TINY_RECIPE


@fuzz(150)
@given(text=st.one_of(
    st.lists(TOML_LINES, max_size=10).map("\n".join), st.binary(max_size=40),
    st.lists(st.tuples(st.sampled_from(["delete", "replace", "insert"]), st.integers(0, 60), TOML_LINES),
             min_size=1, max_size=3).map(lambda edits: edit_lines(tiny_recipe_text(), edits))))
def test_recipe_load_random(work, text):
    from toolkit import recipe as recipe_lib

    path = fresh(work, "r.toml")
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    ok, r = attempt("recipe.load", recipe_lib.load, path)
    if ok:
        assert isinstance(r, recipe_lib.Recipe)
        assert recipe_lib.from_dict(tomllib.loads(r.to_toml()), "again") == r


def recipe_keys():
    import dataclasses

    from toolkit import models
    from toolkit import recipe as recipe_lib

    keys = [("name", None), ("description", None), ("model", "family"), ("bogus", None)]
    for table, cls in recipe_lib.TABLES.items():
        keys += [(table, f.name) for f in dataclasses.fields(cls)] + [(table, "bogus")]
    for family in models.FAMILIES:
        keys += [("model", f.name) for f in dataclasses.fields(models.config_class(family)) if f.init]
    return sorted(set(keys), key=str)


RECIPE_VALUES = st.one_of(JSON_VALUES, st.floats(), st.sampled_from(["llama", "gpt2", "t5", "attractor", "pgpt", "v2",
                                                                     "bytes", "cpu", "cuda:0", "adamw", "step", ""]),
                          st.integers(-2, 300), st.dictionaries(st.sampled_from(["lr", "optimizer", "x"]), JSON_SCALARS,
                                                                 max_size=2).map(lambda d: {"g": d}))


@fuzz(200)
@given(sets=st.lists(st.tuples(st.sampled_from(recipe_keys()), RECIPE_VALUES), min_size=1, max_size=3),
       family=st.sampled_from(["llama", "gpt2", "t5", "attractor", "pgpt"]))
def test_recipe_from_dict_random_values(sets, family):
    from conftest import TINY_RECIPE

    from toolkit import recipe as recipe_lib

    raw = tomllib.loads(TINY_RECIPE)
    raw["model"] = {"family": family} if family != "llama" else raw["model"]
    for (table, key), value in sets:
        if key is None:
            raw[table] = value
        elif isinstance(raw.get(table), dict):
            raw[table][key] = value
    ok, r = attempt("recipe.from_dict", recipe_lib.from_dict, raw, "fuzz.toml")
    if not ok:
        return
    assert isinstance(r, recipe_lib.Recipe)
    d = r.to_dict()
    for (table, key), value in sets:
        if key is not None and isinstance(raw.get(table), dict) and raw[table].get(key) is value and key in d[table]:
            got = d[table][key]
            same = got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))
            assert same, f"[{table}] {key} = {value!r} read back as {got!r}"
    assert recipe_lib.from_dict(tomllib.loads(r.to_toml()), "fuzz.toml") == r


# ---------------------------------------------------------------------------------------------------------
# JSONL: text documents and conversations


MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=8)}), min_size=1, max_size=3)
GOOD_LINES = st.one_of(st.text(max_size=8).map(lambda t: json.dumps({"text": t})), st.text(max_size=8).map(json.dumps),
                       MESSAGES.map(json.dumps), MESSAGES.map(lambda m: json.dumps({"messages": m})))
JSONL_LINES = st.one_of(
    GOOD_LINES, GOOD_LINES,
    JSON_VALUES.map(json.dumps),
    st.builds(lambda t: json.dumps({"text": t}), JSON_VALUES),
    st.builds(lambda m: json.dumps({"messages": m}), JSON_VALUES),
    st.builds(lambda r, c: json.dumps([{"role": r, "content": c}]), st.sampled_from(["user", "assistant", "x", 1]),
              JSON_SCALARS),
    st.sampled_from(["", "   ", "{", "[1,", "NaN", "\"\\ud800\"", "[" * 3000 + "]" * 3000, "{\"text\": \"a\"}\r"]),
)


READER_LINES = {  # mostly lines the reader accepts, so that one odd line is what decides
    "read_jsonl": JSONL_LINES,
    "jsonl_documents": st.text(max_size=8).map(lambda t: json.dumps({"text": t})) | st.text(max_size=8).map(json.dumps),
    "read_conversations": MESSAGES.map(json.dumps) | MESSAGES.map(lambda m: json.dumps({"messages": m})),
}


@fuzz(150)
@given(reader=st.sampled_from(list(READER_LINES)), data=st.data())
def test_jsonl_readers(work, reader, data):
    from toolkit.data.conversations import read_conversations
    from toolkit.data.sources import jsonl_documents, read_jsonl

    good = st.lists(READER_LINES[reader], max_size=4)
    body = data.draw(st.one_of(
        st.binary(max_size=60),
        st.tuples(good, st.integers(0, 4), JSONL_LINES | st.binary(max_size=8)).map(
            lambda t: t[0][: t[1]] + [t[2]] + t[0][t[1] :]),
        good).map(lambda b: b if isinstance(b, bytes) else b"\n".join(
            x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in b)))
    path = fresh(work, "a.jsonl")
    path.write_bytes(body)
    fn = {"read_jsonl": lambda p: list(read_jsonl(p)), "jsonl_documents": lambda p: list(jsonl_documents(p, "text")),
          "read_conversations": lambda p: list(read_conversations(p))}[reader]
    ok, rows = attempt(f"data.{reader}", fn, path)
    if not ok:
        return
    lines = [raw for raw in body.split(b"\n") if raw.decode("utf-8").strip()]  # it read: all lines are UTF-8
    if reader == "read_jsonl":
        assert [r for _, r in rows] == [json.loads(raw) for raw in lines] or any(
            isinstance(r, float) and math.isnan(r) for _, r in rows)
    elif reader == "jsonl_documents":
        assert all(isinstance(t, str) and t.strip() for t in rows)
    else:
        assert len(rows) == len(lines)
        for conv in rows:
            assert conv and all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in conv)


# ---------------------------------------------------------------------------------------------------------
# tokenizer folders (tokenizer.json and the files beside it)


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    from toolkit.tokenizers.audio import AudioTokenizer
    from toolkit.tokenizers.bytes import BytesTokenizer
    from toolkit.tokenizers.llama2c import Llama2cTokenizer
    from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin

    root = tmp_path_factory.mktemp("toks")
    out = {}
    for name, tok in [("bytes", BytesTokenizer(4)), ("audio", AudioTokenizer("flatten", 2, 16, 3))]:
        tok.save(root / name)
        out[name] = (root / name, tok)
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [("▁a", -1.0), ("ab", -2.0)]
    write_tokenizer_bin(root / "tokenizer.bin", pieces, 1, 2)
    tok = Llama2cTokenizer.from_file(root / "tokenizer.bin", len(pieces))
    tok.save(root / "llama2c")
    out["llama2c"] = (root / "llama2c", tok)
    return out


TOKENIZER_KEYS = ["kind", "fingerprint", "vocab_size", "n_sentinels", "layout", "n_codebooks", "codebook_size",
                  "encoding", "vocab_cap", "cap_policy", "bos_id"]


@fuzz(150)
@given(name=st.sampled_from(["bytes", "audio", "llama2c"]),
       edits=st.dictionaries(st.sampled_from(TOKENIZER_KEYS), st.none() | JSON_VALUES | st.sampled_from(
           ["bytes", "audio", "llama2c", "tiktoken", "sentencepiece", "flatten", "delay", 0, 1, 259, 1000]), max_size=2),
       raw=st.none() | st.binary(max_size=30) | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
       how=st.none() | MUTATIONS)
def test_tokenizer_load(work, tokenizer_folders, name, edits, raw, how):
    from toolkit import tokenizers

    source, original = tokenizer_folders[name]
    folder = fresh(work, "tok")
    shutil.copytree(source, folder)
    meta = json.loads((folder / "tokenizer.json").read_text())
    for k, v in edits.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (folder / "tokenizer.json").write_bytes(raw if raw is not None else json.dumps(meta).encode())
    if how is not None and (folder / "tokenizer.bin").is_file():
        (folder / "tokenizer.bin").write_bytes(mutate((folder / "tokenizer.bin").read_bytes(), how))
    ok, tok = attempt("tokenizers.load", tokenizers.load, folder)
    if ok:
        assert (tok.kind, tok.vocab_size, tok.fingerprint) == (original.kind, original.vocab_size,
                                                                original.fingerprint)
        if tok.kind != "audio":  # the audio tokenizer encodes codes, not text
            assert tok.encode("ab") == original.encode("ab")


# ---------------------------------------------------------------------------------------------------------
# run folders with a missing or corrupt member


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from conftest import TINY_RECIPE

    from toolkit import recipe as recipe_lib
    from toolkit.train.loop import train

    root = tmp_path_factory.mktemp("run")
    (root / "tiny.toml").write_text(TINY_RECIPE)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = recipe_lib.load(root / "tiny.toml", ["train.max_iters=2", "train.eval_interval=2",
                                                 "data.synthetic_stories=50"])
        train(r, root / "run")
    finally:
        torch.set_num_threads(n)
    from toolkit.run import load_run

    return root / "run", load_run(root / "run")


RUN_MEMBERS = ["model.safetensors", "recipe.toml", "tokenizer/tokenizer.json", "state.pt", "run.json"]


def torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


STATE_LIKE = st.sampled_from([torch.zeros(3), [1, 2], {"step": "2"}, {"step": 2.0}, {"optimizers": []}, None,
                              {"step": 2, "x": torch.ones(2)}]).map(lambda o: ("replace", torch_bytes(o)))


@fuzz(120)
@given(member=st.sampled_from(RUN_MEMBERS), how=st.just(("delete",)) | MUTATIONS | STATE_LIKE
       | st.tuples(st.just("flip"), st.integers(0, 200), st.integers(0, 255)))
def test_run_folder_member(work, run_folder, member, how):
    from toolkit.run import STATE, load_run, load_state

    source, original = run_folder
    folder = fresh(work, "run")
    shutil.copytree(source, folder)
    target = folder / member
    if how[0] == "delete":
        target.unlink()
    else:
        target.write_bytes(mutate(target.read_bytes(), how))
    intact = target.is_file() and target.read_bytes() == (source / member).read_bytes()
    if member == STATE:
        ok, state = attempt("run.load_state", load_state, target)
        if ok:
            assert isinstance(state, dict) and isinstance(state.get("step"), int)
        if intact:
            assert ok and state["step"] == original.step
        return
    ok, run = attempt("run.load_run", load_run, folder)
    if ok:
        assert run.recipe.model == original.recipe.model or member == "recipe.toml"
        assert isinstance(run.info, dict) and isinstance(run.step, int)
        assert run.tokenizer.fingerprint == original.tokenizer.fingerprint
        assert set(run.model.state_dict()) == set(original.model.state_dict())
    if intact:
        assert ok and run.step == original.step and run.info == original.info
        for k, v in original.model.state_dict().items():
            torch.testing.assert_close(run.model.state_dict()[k], v, atol=0, rtol=0)
