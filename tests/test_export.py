"""llama2.c .bin export/import: byte layouts checked by an independent reader written here from the spec
(anchors §1.1-1.3), round trips, Q8 error, greedy parity, and errors for truncated or foreign files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from helpers_export import make_run, sentencepiece_tokenizer

from toolkit import export as ex
from toolkit.errors import UserError
from toolkit.export import llama2c
from toolkit.run import load_run
from toolkit.tokenizers.bytes import BytesTokenizer

# --------------------------------------------------------------------------------------------------------
# an independent reader, from the format description only


class Spec:
    """Walks a llama2.c model.bin with struct/numpy only: header fields at their offsets, then the tensors."""

    def __init__(self, data: bytes):
        self.data = data
        magic = struct.unpack_from("<I", data, 0)[0]
        if magic == 0x616B3432:
            assert data[:4] == b"\x32\x34\x6b\x61"  # "ak42" read as a big-endian int, little-endian on disk
            self.version = struct.unpack_from("<i", data, 4)[0]
            (self.dim, self.hidden, self.layers, self.heads, self.kv_heads, self.vocab,
             self.seq) = struct.unpack_from("<7i", data, 8)
            self.shared = data[36]
            self.gs = struct.unpack_from("<i", data, 37)[0] if self.version == 2 else None
            end = 41 if self.version == 2 else 37
            assert data[end:256] == b"\0" * (256 - end), "header padding must be zeros"
            self.off = 256
        else:
            self.version = 0
            (self.dim, self.hidden, self.layers, self.heads, self.kv_heads, vocab,
             self.seq) = struct.unpack_from("<7i", data, 0)
            self.vocab, self.shared = abs(vocab), int(vocab > 0)
            self.off = 28

    def f32(self, *shape):
        n = int(np.prod(shape))
        a = np.frombuffer(self.data, np.float32, n, self.off).reshape(shape)
        self.off += 4 * n
        return a

    def q8(self, *shape):
        n = int(np.prod(shape))
        q = np.frombuffer(self.data, np.int8, n, self.off)
        self.off += n
        s = np.frombuffer(self.data, np.float32, n // self.gs, self.off)
        self.off += 4 * (n // self.gs)
        return q, s, shape

    def read(self):
        D, F, L, V, hs = self.dim, self.hidden, self.layers, self.vocab, self.dim // self.heads
        kv = self.kv_heads * hs
        t = {}
        if self.version == 0:
            t["emb"] = self.f32(V, D)
            t["att_norm"] = [self.f32(D) for _ in range(L)]
            t["wq"] = [self.f32(D, D) for _ in range(L)]
            t["wk"] = [self.f32(kv, D) for _ in range(L)]
            t["wv"] = [self.f32(kv, D) for _ in range(L)]
            t["wo"] = [self.f32(D, D) for _ in range(L)]
            t["ffn_norm"] = [self.f32(D) for _ in range(L)]
            t["w1"] = [self.f32(F, D) for _ in range(L)]
            t["w2"] = [self.f32(D, F) for _ in range(L)]
            t["w3"] = [self.f32(F, D) for _ in range(L)]
            t["norm"] = self.f32(D)
            t["freq_real"] = self.f32(self.seq, hs // 2)
            t["freq_imag"] = self.f32(self.seq, hs // 2)
            if not self.shared:
                t["out"] = self.f32(V, D)
        else:
            t["att_norm"] = [self.f32(D) for _ in range(L)]
            t["ffn_norm"] = [self.f32(D) for _ in range(L)]
            t["norm"] = self.f32(D)
            mat = self.f32 if self.version == 1 else self.q8
            t["emb"] = mat(V, D)
            for name, shape in (("wq", (D, D)), ("wk", (kv, D)), ("wv", (kv, D)), ("wo", (D, D)),
                                ("w1", (F, D)), ("w2", (D, F)), ("w3", (F, D))):
                t[name] = [mat(*shape) for _ in range(L)]
            if not self.shared:
                t["out"] = mat(V, D)
        assert self.off == len(self.data), f"{len(self.data) - self.off} bytes left after the last tensor"
        return t


def model_tensors(model) -> dict:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    L = model.config.n_layers
    g = {"emb": sd["tok_embeddings.weight"], "norm": sd["norm.weight"], "out": sd["output.weight"]}
    for key, name in (("att_norm", "attention_norm"), ("ffn_norm", "ffn_norm")):
        g[key] = [sd[f"layers.{i}.{name}.weight"] for i in range(L)]
    for key in ("wq", "wk", "wv", "wo"):
        g[key] = [sd[f"layers.{i}.attention.{key}.weight"] for i in range(L)]
    for key in ("w1", "w2", "w3"):
        g[key] = [sd[f"layers.{i}.feed_forward.{key}.weight"] for i in range(L)]
    return g


def build(tie=True, kv=0, hidden=0, vocab=300, seed=0):
    from toolkit.models.llama import Config, Model

    torch.manual_seed(seed)
    return Model(Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=vocab, max_seq_len=32,
                        hidden_dim=hidden, tie_embeddings=tie)).eval()


# --------------------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("tie,kv", [(True, 0), (False, 2), (True, 1)])
@pytest.mark.parametrize("version", [0, 1])
def test_fp32_layout_byte_exact(tmp_path, version, tie, kv):
    model = build(tie, kv)
    path = tmp_path / "m.bin"
    llama2c.export_model(model, path, version)
    spec = Spec(path.read_bytes())
    c = model.config
    assert (spec.version, spec.dim, spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.vocab, spec.seq) == \
        (version, 64, c.ffn_dim, 2, 4, c.kv_heads, 300, 32)
    assert spec.shared == int(tie)
    if version == 0:
        raw_vocab = struct.unpack_from("<i", path.read_bytes(), 20)[0]
        assert raw_vocab == (300 if tie else -300)  # negative = classifier stored at the end
    got, want = spec.read(), model_tensors(model)
    for key, value in got.items():
        if key.startswith("freq"):
            continue
        ref = want[key]
        for a, b in zip(value, ref) if isinstance(value, list) else [(value, ref)]:
            assert np.array_equal(a, b), key
    if version == 0:  # RoPE tables as llama2.c's precompute_freqs_cis: theta 10000, head_size 16
        hs = 16
        freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2)[: hs // 2] / hs))
        angles = np.outer(np.arange(32), freqs)
        assert np.allclose(got["freq_real"], np.cos(angles), atol=1e-6)
        assert np.allclose(got["freq_imag"], np.sin(angles), atol=1e-6)
    assert ("out" in got) == (not tie)


@pytest.mark.parametrize("tie", [True, False])
def test_v2_layout_and_q8_error(tmp_path, tie):
    model = build(tie, kv=2, hidden=96)  # 96 is not a multiple of 64: the group size must drop to 32
    path = tmp_path / "q.bin"
    h = llama2c.export_model(model, path, 2)
    assert h.group_size == 32
    spec = Spec(path.read_bytes())
    assert spec.version == 2 and spec.gs == 32 and spec.shared == int(tie) and spec.hidden == 96
    got, want = spec.read(), model_tensors(model)
    for key in ("att_norm", "ffn_norm"):  # norms stay fp32, exact
        for a, b in zip(got[key], want[key]):
            assert np.array_equal(a, b)
    assert np.array_equal(got["norm"], want["norm"])
    for key in ("emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3") + (() if tie else ("out",)):
        items = got[key] if isinstance(got[key], list) else [got[key]]
        refs = want[key] if isinstance(want[key], list) else [want[key]]
        for (q, s, _), ref in zip(items, refs):
            groups = ref.reshape(-1, 32)
            assert np.allclose(s, np.abs(groups).max(1) / 127.0, rtol=1e-6)  # scale = max|w| / 127
            assert np.abs(q).max() <= 127
            deq = q.reshape(-1, 32).astype(np.float32) * s[:, None]
            assert np.all(np.abs(deq - groups) <= s[:, None] / 2 + 1e-7), key  # within half a step


def test_q8_zero_group_and_bound():
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    w[1, :32] = 0.0
    q, s = llama2c.quantize_q80(w, 32)
    assert s[2] == 0 and np.all(q[64:96] == 0)
    back = llama2c.dequantize_q80(q, s, 32).reshape(8, 64)
    assert np.all(np.abs(back - w) <= np.repeat(s, 32).reshape(8, 64) / 2 + 1e-7)
    assert np.abs(back - w).max() > 0  # it is lossy, the check above can fail


def test_group_size_divides_dim_and_hidden():
    assert llama2c.pick_group_size(288, 768) == 32  # llama2.c halves 64 for dim 288 too
    assert llama2c.pick_group_size(512, 1376) == 32  # stories42M: llama2.c kept 64, which breaks runq.c
    assert llama2c.pick_group_size(64, 172) == 4
    with pytest.raises(UserError, match="must divide both"):
        llama2c.pick_group_size(512, 1376, 64)


# --------------------------------------------------------------------------------------------------------
# bad files


def test_truncated_extra_and_foreign_files(tmp_path):
    path = tmp_path / "m.bin"
    llama2c.export_model(build(), path, 0)
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"truncated: .* needs [\d,]+ bytes, the file has"):
        llama2c.read_bin(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    with pytest.raises(UserError, match="8 bytes more than"):
        llama2c.read_bin(tmp_path / "long.bin")
    (tmp_path / "text.bin").write_bytes(b"this is a text file, not a model at all\n" * 10)
    with pytest.raises(UserError, match="not a llama2.c model.bin"):
        llama2c.read_bin(tmp_path / "text.bin")
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match="too short"):
        llama2c.read_bin(tmp_path / "tiny.bin")
    v1 = tmp_path / "v1.bin"
    llama2c.export_model(build(), v1, 1)
    (tmp_path / "v1short.bin").write_bytes(v1.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        llama2c.read_bin(tmp_path / "v1short.bin")
    bad = bytearray(v1.read_bytes())
    bad[4] = 7
    (tmp_path / "v7.bin").write_bytes(bytes(bad))
    with pytest.raises(UserError, match="version 7 is not supported"):
        llama2c.read_bin(tmp_path / "v7.bin")


def cli(*args) -> int:
    from toolkit.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code or 0
    return 0


def test_cli_truncated_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.bin"
    llama2c.export_model(build(), path, 0)
    path.write_bytes(path.read_bytes()[:5000])
    assert cli("export", path, "-o", tmp_path / "imp") == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "imp").exists()


# --------------------------------------------------------------------------------------------------------
# run folders <-> .bin


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    tok = sentencepiece_tokenizer(root / "tok")
    return make_run(root / "run", tok, n_kv_heads=2, tie=False)


@pytest.mark.parametrize("fmt", ["v0", "v1", "v2"])
def test_export_import_round_trip(sp_run, tmp_path, fmt):
    out = tmp_path / "out" / "model.bin"
    result = ex.export_run(sp_run, out, fmt)
    assert {p.name for p in result.files} == {"model.bin", "tokenizer.bin", "tokenizer.model", "model.json"}
    side = json.loads((tmp_path / "out" / "model.json").read_text())
    run = load_run(sp_run)
    assert side["vocab_size"] == run.tokenizer.vocab_size
    assert side["tokenizer"]["fingerprint"] == run.tokenizer.fingerprint
    assert side["recipe"]["model"]["dim"] == 64 and side["version"] == int(fmt[1])
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == (sp_run / "tokenizer" / "tokenizer.bin").read_bytes()

    folder = ex.import_bin(out, None, tmp_path / "imported")
    back = load_run(folder)
    assert back.recipe.model == run.recipe.model  # the sidecar's recipe, resolved
    assert back.tokenizer.kind == "sentencepiece" and back.tokenizer.fingerprint == run.tokenizer.fingerprint
    a, b = run.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if fmt == "v2" and k.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                                       "w3.weight", "tok_embeddings.weight", "output.weight")):
            step = a[k].abs().max() / 127
            assert (a[k] - b[k]).abs().max() <= step / 2 + 1e-7, k
        else:
            assert torch.equal(a[k], b[k]), k


def test_import_without_sidecar_uses_tokenizer_bin_alone(sp_run, tmp_path):
    out = tmp_path / "model.bin"
    ex.export_run(sp_run, out, "v0")
    (tmp_path / "model.json").unlink()
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tok.bin").write_bytes((tmp_path / "tokenizer.bin").read_bytes())
    folder = ex.import_bin(out, tmp_path / "tok.bin", tmp_path / "imp")
    back = load_run(folder)
    assert back.tokenizer.kind == "llama2c"
    assert back.recipe.model.dim == 64 and back.recipe.model.n_kv_heads == 2 and not back.recipe.model.tie_embeddings
    run = load_run(sp_run)
    text = "Lily had a kite. It was day 7."
    assert back.tokenizer.encode(text) == run.tokenizer.encode(text)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])


def test_greedy_parity_run_folder_and_bin(sp_run, tmp_path):
    from toolkit.chat import Session, load_target
    from toolkit.generate import Sampling

    out = tmp_path / "model.bin"
    ex.export_run(sp_run, out, "v0")
    ex.export_run(sp_run, tmp_path / "m1.bin", "v1")
    texts = []
    for target in (sp_run, out, tmp_path / "m1.bin"):
        s = Session(load_target(target), Sampling(temperature=0), max_new_tokens=40)
        pieces = []
        s.reply("Lily had a", pieces.append)
        texts.append("".join(pieces))
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) > 0


def test_export_refuses_to_overwrite(sp_run, tmp_path):
    out = tmp_path / "model.bin"
    ex.export_run(sp_run, out)
    with pytest.raises(UserError, match="already exists; pass --force"):
        ex.export_run(sp_run, out)
    ex.export_run(sp_run, out, force=True)
    ex.export_run(sp_run, tmp_path / "q.bin", "v2")  # same tokenizer.bin beside it: not a clash
    (tmp_path / "tokenizer.bin").write_bytes(b"something else")
    with pytest.raises(UserError, match="tokenizer.bin already exists"):
        ex.export_run(sp_run, tmp_path / "other.bin")
    (tmp_path / "imp").mkdir()
    (tmp_path / "imp" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        ex.import_bin(out, tmp_path / "q_tok.bin", tmp_path / "imp")
    assert (tmp_path / "imp" / "notes.txt").read_text() == "mine"


def test_cli_export_and_import(sp_run, tmp_path, capsys):
    out = tmp_path / "o" / "model_q8.bin"
    assert cli("export", sp_run, "-o", out, "--format", "v2", "--group-size", "16") == 0
    assert Spec(out.read_bytes()).gs == 16
    assert cli("export", out, "-z", tmp_path / "o" / "tokenizer.bin", "-o", tmp_path / "imp") == 0
    assert (tmp_path / "imp" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli("export", sp_run, "-o", tmp_path / "x.bin", "--format", "v2", "--group-size", "48") == 1
    assert "must divide both" in capsys.readouterr().err
    assert cli("export", sp_run, "-o", tmp_path / "x.bin", "--group-size", "16") == 1
    assert "--group-size is for --format v2" in capsys.readouterr().err
    assert cli("export", sp_run, "-o", out, "--format", "v2") == 1
    assert "already exists" in capsys.readouterr().err


def test_non_llama_vocabulary_exports_model_only(tmp_path):
    run = make_run(tmp_path / "run", BytesTokenizer(0))
    result = ex.export_run(run, tmp_path / "model.bin")
    assert [p.name for p in result.files] == ["model.bin", "model.json"]
    assert any("run.c cannot use this vocabulary" in w for w in result.warnings)
