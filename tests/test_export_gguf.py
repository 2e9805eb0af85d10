"""GGUF export and import: keys and tensors read back with gguf.GGUFReader, a numpy forward written here from
llama.cpp's conventions (ggml (out, in) matrices, RoPE over consecutive pairs, GQA head h -> KV head h // r)
gives lmkit's logits, imports round-trip (f32 exact; f16/bf16/q8_0 within their rounding), and
`lmkit chat model.gguf` prints what `lmkit chat RUN` prints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import lmkit
from helpers_export import make_run, sentencepiece_tokenizer

from toolkit import export as ex
from toolkit.errors import UserError
from toolkit.run import load_run

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "tied": make_run(root / "tied", tok, train_steps=40),
            "gqa": make_run(root / "gqa", tok, n_kv_heads=2, tie=False, seed=1),
            "sft": make_run(root / "sft", tok, chat_template="llama2", seed=2),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory, runs):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name in ("tied", "gqa"):
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            out[name, dtype] = ex.export_gguf(runs[name], root / f"{name}_{dtype}.gguf", dtype).path
    return out


def value(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing {key}"
    return f.contents()


# --------------------------------------------------------------------------------------------------------
# keys and tensors


@pytest.mark.parametrize("name", ["tied", "gqa"])
def test_required_keys_and_tensors(files, runs, tok, name):
    reader = gguf.GGUFReader(str(files[name, "f16"]))
    c = load_run(runs[name]).model.config
    assert value(reader, "general.architecture") == "llama"
    expected = {"llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": c.ffn_dim, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": c.kv_heads, "llama.rope.dimension_count": 16,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.model": "llama"}
    for key, want in expected.items():
        assert value(reader, key) == want, key
    assert value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert value(reader, "llama.rope.freq_base") == 10000.0
    tokens, scores = value(reader, "tokenizer.ggml.tokens"), value(reader, "tokenizer.ggml.scores")
    types = value(reader, "tokenizer.ggml.token_type")
    assert tokens == [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert scores == pytest.approx([tok.sp.get_score(i) for i in range(tok.vocab_size)])
    T = gguf.TokenType
    assert types[:4] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE] and types[258] == T.BYTE
    assert set(types[259:]) == {T.NORMAL}
    shapes = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}
    F = c.ffn_dim
    want = {"token_embd.weight": (64, 320), "output_norm.weight": (64,)}
    for i in range(2):
        want.update({f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.ffn_norm.weight": (64,),
                     f"blk.{i}.attn_q.weight": (64, 64), f"blk.{i}.attn_k.weight": (64, 16 * c.kv_heads),
                     f"blk.{i}.attn_v.weight": (64, 16 * c.kv_heads), f"blk.{i}.attn_output.weight": (64, 64),
                     f"blk.{i}.ffn_gate.weight": (64, F), f"blk.{i}.ffn_up.weight": (64, F),
                     f"blk.{i}.ffn_down.weight": (F, 64)})
    if not c.tie_embeddings:
        want["output.weight"] = (64, 320)
    assert {k: s for k, (s, _) in shapes.items()} == want  # ggml order: ne0 (the input dimension) first
    Q = gguf.GGMLQuantizationType
    assert {t for k, (s, t) in shapes.items() if len(s) == 1} == {Q.F32}
    assert {t for k, (s, t) in shapes.items() if len(s) == 2} == {Q.F16}
    q8 = gguf.GGUFReader(str(files[name, "q8_0"]))
    assert {t.tensor_type for t in q8.tensors if len(t.shape) == 2} == {Q.Q8_0}


def test_chat_template_and_recipe_ride_along(runs, tmp_path):
    path = ex.export_gguf(runs["sft"], tmp_path / "sft.gguf", "f32").path
    reader = gguf.GGUFReader(str(path))
    assert "[INST]" in value(reader, "tokenizer.chat_template")
    assert load_run(ex.import_gguf(path, tmp_path / "back")).recipe.data.chat_template == "llama2"


# --------------------------------------------------------------------------------------------------------
# an independent forward over the GGUF's tensors


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_pairs(x, base):
    """ggml's LLAMA_ROPE_TYPE_NORM: rotate (x[2i], x[2i+1]) of each head by pos * base^(-2i/d). x: (T, H, d)."""
    T, _, d = x.shape
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out


def gguf_forward(path, ids, permute_qk=None):
    reader = gguf.GGUFReader(str(path))
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    if permute_qk is not None:
        W = {k: permute_qk(k, w) if k.endswith(("attn_q.weight", "attn_k.weight")) else w for k, w in W.items()}
    n_layers = value(reader, "llama.block_count")
    H, Hkv = value(reader, "llama.attention.head_count"), value(reader, "llama.attention.head_count_kv")
    eps, base = value(reader, "llama.attention.layer_norm_rms_epsilon"), value(reader, "llama.rope.freq_base")
    x = W["token_embd.weight"][ids]  # get_rows
    T, D = x.shape
    d = D // H
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        b = f"blk.{i}."
        h = rms_norm(x, W[b + "attn_norm.weight"], eps)
        q = rope_pairs((h @ W[b + "attn_q.weight"].T).reshape(T, H, d), base)
        k = rope_pairs((h @ W[b + "attn_k.weight"].T).reshape(T, Hkv, d), base)
        v = (h @ W[b + "attn_v.weight"].T).reshape(T, Hkv, d)
        heads = []
        for j in range(H):
            kv = j // (H // Hkv)
            s = q[:, j] @ k[:, kv].T / np.sqrt(d) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ W[b + "attn_output.weight"].T
        h = rms_norm(x, W[b + "ffn_norm.weight"], eps)
        gate = h @ W[b + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ W[b + "ffn_up.weight"].T)) @ W[b + "ffn_down.weight"].T
    x = rms_norm(x, W["output_norm.weight"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T


@pytest.mark.parametrize("name", ["tied", "gqa"])
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 5e-2)])
def test_numpy_forward_gives_lmkit_logits(files, runs, tok, name, dtype, tol):
    ids = [tok.bos_id] + tok.encode("Lily had a kite. It was day 7. She")
    with torch.no_grad():
        ours = load_run(runs[name]).model(torch.tensor([ids]))[0][0].double().numpy()
    theirs = gguf_forward(files[name, dtype], ids)
    assert np.abs(ours - theirs).max() < tol


def test_rotate_half_layout_would_be_wrong(files, runs, tok):
    """The check above can fail: with q/k rows in HF's rotate-half order, llama.cpp's RoPE gives other logits."""
    from toolkit.export.hf import interleaved_to_halves

    c = load_run(runs["gqa"]).model.config

    def to_halves(name, w):
        heads = c.n_heads if name.endswith("attn_q.weight") else c.kv_heads
        return interleaved_to_halves(torch.from_numpy(w), heads).numpy()

    ids = [tok.bos_id] + tok.encode("Lily had a kite. It was day 7. She")
    right, wrong = gguf_forward(files["gqa", "f32"], ids), gguf_forward(files["gqa", "f32"], ids, to_halves)
    assert np.abs(right - wrong).max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# import


@pytest.mark.parametrize("name", ["tied", "gqa"])
def test_import_round_trip(files, runs, tmp_path, name):
    run = load_run(runs[name])
    a = run.model.state_dict()
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        back = load_run(ex.import_gguf(files[name, dtype], tmp_path / dtype))
        assert back.recipe.model == run.recipe.model and back.tokenizer.fingerprint == run.tokenizer.fingerprint
        b = back.model.state_dict()
        assert a.keys() == b.keys()
        for k, v in a.items():
            if v.ndim == 1 or dtype == "f32":
                assert torch.equal(b[k], v), (dtype, k)
            elif dtype in ("f16", "bf16"):
                assert torch.equal(b[k], v.to(torch.float16 if dtype == "f16" else torch.bfloat16).float()), (dtype, k)
            else:  # q8_0: blocks of 32 along a row, q = round(w / d), d = max|w| / 127 stored as an f16: half a
                # step, plus 127 times the f16 rounding of d
                step = v.reshape(-1, 32).abs().max(1).values / 127
                err = (b[k] - v).reshape(-1, 32).abs().max(1).values
                assert bool((err <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all()), k
                assert bool((err > 0).any())  # it is lossy: the bound above can fail


def test_foreign_gguf_gets_a_tokenizer_from_its_tokens(files, runs, monkeypatch, tok):
    from toolkit.export import gguf as G

    monkeypatch.setattr(G, "SP_KEY", "absent.tokenizer")  # read it as a file llama.cpp wrote would be read
    monkeypatch.setattr(G, "RECIPE_KEY", "absent.recipe")
    opened = ex.open_gguf(files["gqa", "f32"])
    assert opened.tokenizer.kind == "llama2c" and opened.recipe.model.n_kv_heads == 2
    for text in ("Lily had a kite. It was day 7.", "Zoë and José at the café!"):
        assert opened.tokenizer.encode(text) == tok.encode(text)
    run = load_run(runs["gqa"])
    for k, v in run.model.state_dict().items():
        assert torch.equal(opened.model.state_dict()[k], v)


# --------------------------------------------------------------------------------------------------------
# chat and the CLI


@pytest.mark.parametrize("name,prompt", [("gqa", "Lily had a"), ("sft", "Who had a ball?")])
def test_chat_gguf_prints_what_the_run_prints(runs, tmp_path, capsys, name, prompt):
    path = tmp_path / "m.gguf"
    assert lmkit(capsys, "export", str(runs[name]), "-o", str(path), "--format", "gguf", "--dtype", "f32")[0] == 0
    args = ["--prompt", prompt, "--temperature", "0", "-n", "30", "--device", "cpu"]
    code, want, _ = lmkit(capsys, "chat", str(runs[name]), *args)
    assert code == 0 and want.strip()
    code, got, _ = lmkit(capsys, "chat", str(path), *args)
    assert code == 0 and got == want


def test_cli_errors_are_one_line(runs, files, tmp_path, capsys):
    code, _, err = lmkit(capsys, "export", str(runs["tied"]), "-o", str(tmp_path / "x.gguf"), "--format", "gguf",
                         "--dtype", "q4_k")
    assert code == 1 and "--dtype 'q4_k'" in err
    code, _, err = lmkit(capsys, "export", str(runs["tied"]), "-o", str(files["tied", "f16"]), "--format", "gguf")
    assert code == 1 and "already exists; pass --force" in err
    code, _, err = lmkit(capsys, "export", str(runs["tied"]), "-o", str(tmp_path / "y.bin"), "--dtype", "f16")
    assert code == 1 and "--dtype is for --format hf or gguf" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(files["tied", "f16"].read_bytes()[:3000])
    for cmd in (["export", str(bad), "-o", str(tmp_path / "imp")], ["chat", str(bad), "--prompt", "hi"]):
        code, _, err = lmkit(capsys, *cmd)
        assert code == 1 and "not a readable GGUF" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match="is a folder"):
        ex.export_gguf(runs["tied"], tmp_path)
