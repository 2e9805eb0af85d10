"""The C decode step (toolkit/models/llama_cpu.c): its logits against the torch model's, in fp32 and on bfloat16
and int8 weights, the same numbers on one thread and two, the numpy step still there behind LMKIT_DECODE_STEP=numpy, and
`lmkit chat --dtype`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import lmkit

from toolkit import generate as G
from toolkit.models import llama_cpu as L
from toolkit.models.llama import Config, Model

needs_c = pytest.mark.skipif(L.c_library() is None, reason="the C decode step was not built (no C compiler)")


def tiny(kv=0, tie=True, seed=0, vocab=200, seq=64, dim=48):
    torch.manual_seed(seed)
    return Model(Config(dim=dim, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=vocab, max_seq_len=seq,
                        tie_embeddings=tie)).eval()


def test_the_c_step_is_built_where_a_compiler_is():
    """`make install` builds it whenever gcc or cc is on the PATH: a broken build would silently fall back to the
    slower numpy step, so say so here instead."""
    if shutil.which("gcc") or shutil.which("cc"):
        assert L.c_library() is not None, "a C compiler is here but toolkit/models/_llama_cpu was not built"


@needs_c
@pytest.mark.parametrize("kv,tie,dim", [(0, True, 48), (2, False, 48), (1, True, 48), (2, False, 40)])
def test_c_step_logits_equal_the_torch_forward(kv, tie, dim):
    """dim 40: rows whose last 16 floats are partial (8 of them), and 4-row blocks with a remainder."""
    model = tiny(kv, tie, dim=dim)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)[0][0].numpy()
    dec = model.make_decoder()
    assert isinstance(dec, L.CLlamaDecoder) and dec.backend == "C"
    got = [dec.logits(ids[0, :12].tolist())]  # the prompt through numpy's prefill, then one C step per token
    got += [dec.logits(ids[0, :t].tolist()) for t in range(13, 41)]
    assert np.abs(np.stack(got) - full[11:40]).max() < 1e-5


def int8_rows_reference(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8, dequantized, written independently of llama_cpu.to_int8_rows."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def test_int8_rows_round_to_the_nearest_step_of_each_rows_scale():
    w = torch.randn(50, 70) * torch.linspace(0.01, 5, 50)[:, None]
    w[3] = 0.0  # an all-zero row stays zero (scale 0)
    q, scale = L.to_int8_rows(w.numpy())
    assert q.dtype == np.int8 and scale.shape == (50,) and np.abs(q).max() == 127
    got = q.astype(np.float32) * scale[:, None]
    assert np.abs(got - int8_rows_reference(w).nan_to_num(0.0).numpy()).max() < 1e-6
    assert (np.abs(got - w.numpy()) <= scale[:, None] / 2 + 1e-6).all()


@needs_c
@pytest.mark.parametrize("dtype,dim", [("bfloat16", 48), ("int8", 48), ("int8", 40)])
def test_reduced_precision_step_equals_the_model_with_its_matrices_rounded(dtype, dim):
    """--dtype bfloat16 / int8: every token (the prompt too) through the C step on bfloat16 matrices, or int8 ones
    with a scale per row, which must be the torch model whose matrices are rounded so (the embedding and the gains
    stay fp32), computed in fp32; and the bfloat16 rounding is torch's, bit for bit."""
    model = tiny(kv=2, tie=False, dim=dim)
    w = torch.randn(1000) * 3
    assert np.array_equal(L.to_bfloat16(w.numpy()), w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    rounded = tiny(kv=2, tie=False, dim=dim)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2 and name != "tok_embeddings.weight":
                p.copy_(p.to(torch.bfloat16).float() if dtype == "bfloat16" else int8_rows_reference(p))
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want, plain = rounded(ids)[0][0].numpy(), model(ids)[0][0].numpy()
    dec = L.cpu_decoder(L.decode_weights(model), dtype)
    got = np.stack([dec.logits(ids[0, :10].tolist())] + [dec.logits(ids[0, :t].tolist()) for t in range(11, 31)])
    assert np.abs(got - want[9:30]).max() < 1e-5
    assert np.abs(got - plain[9:30]).max() > 1e-4  # and it is not the fp32 model


@needs_c
def test_one_thread_and_two_give_the_same_logits_bit_for_bit(tmp_path):
    """Each output row is one thread's dot product in one order, whatever the team's size."""
    script = textwrap.dedent("""
        import sys, numpy as np, torch
        from toolkit.models.llama import Config, Model
        torch.manual_seed(0)
        m = Model(Config(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=32)).eval()
        d = m.make_decoder()
        assert d.threads == int(sys.argv[2]), d.threads
        np.save(sys.argv[1], np.stack([d.logits(list(range(1, t))) for t in range(2, 20)]))
    """)
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.npy"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", script, str(out), str(threads)], check=True, env=env)
        outs.append(np.load(out))
    assert np.array_equal(outs[0], outs[1])


def test_numpy_step_behind_the_switch(monkeypatch):
    """LMKIT_DECODE_STEP=numpy: today's numpy decoder on (in, out) copies of the matrices, and its logits are
    the torch forward's; a bfloat16 request then says it needs the C step."""
    monkeypatch.setenv(L.STEP_ENV, "numpy")
    L.c_library.cache_clear()
    try:
        model = tiny(kv=2)
        dec = model.make_decoder()
        assert type(dec) is L.LlamaCPUDecoder and dec.backend == "numpy"
        assert all(m.flags.c_contiguous for layer in dec.w.layers for m in layer)
        ids = list(range(5, 25))
        with torch.inference_mode():
            want = model(torch.tensor([ids]))[0][0, -1].numpy()
        assert np.abs(dec.logits(ids) - want).max() < 1e-5
        with pytest.raises(ValueError, match="need the C decode step"):
            L.cpu_decoder(L.decode_weights(tiny(seed=1)), "bfloat16")
    finally:
        monkeypatch.delenv(L.STEP_ENV)
        L.c_library.cache_clear()


@needs_c
def test_c_and_numpy_steps_pick_the_same_greedy_tokens():
    model = tiny(kv=0, vocab=300, seq=128)
    c_ids = G.generate(model.make_decoder(), [1, 7], 100, G.Sampling(temperature=0.0))
    numpy_ids = G.generate(L.LlamaCPUDecoder(L.decode_weights(model)), [1, 7], 100, G.Sampling(temperature=0.0))
    assert c_ids == numpy_ids and len(c_ids) == 100


@needs_c
def test_chat_dtype_bfloat16_on_a_bin(capsys, tmp_path):
    from toolkit.export import llama2c
    from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [("\u2581" + chr(97 + i), -1.0 - i) for i in range(20)]
    llama2c.export_model(tiny(vocab=len(pieces)), tmp_path / "model.bin", 0)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", pieces, 1, 2)
    rc, out, err = lmkit(capsys, "chat", str(tmp_path / "model.bin"), "--prompt", "ab", "-n", "12", "-t", "0",
                         "--dtype", "bfloat16")
    assert rc == 0 and out.strip() and "C step, bfloat16" in err
    rc, out, err = lmkit(capsys, "chat", str(tmp_path / "model.bin"), "--prompt", "ab", "-n", "12", "-t", "0",
                         "--dtype", "int8")
    assert rc == 0 and out.strip() and "C step, int8" in err
    rc, out, err = lmkit(capsys, "chat", str(tmp_path / "model.bin"), "--prompt", "ab", "-n", "12", "-t", "0")
    assert rc == 0 and "C step, float32" in err
    rc, out, err = lmkit(capsys, "chat", str(tmp_path / "model.bin"), "--prompt", "ab", "--dtype", "float16")
    assert rc != 0 and "--dtype float16: expected float32, bfloat16 or int8" in err and "Traceback" not in err


@pytest.mark.parametrize("var,value,message", [(L.STEP_ENV, "fast", "LMKIT_DECODE_STEP=fast: expected c or numpy"),
                                                ("LMKIT_PREFETCH", "lots", "LMKIT_PREFETCH=lots: expected a number")])
def test_a_bad_decode_setting_is_one_line(capsys, tmp_path, monkeypatch, var, value, message):
    from toolkit.export import llama2c
    from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    llama2c.export_model(tiny(vocab=len(pieces)), tmp_path / "model.bin", 0)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", pieces, 1, 2)
    monkeypatch.setenv(var, value)
    L.c_library.cache_clear()
    try:
        rc, out, err = lmkit(capsys, "chat", str(tmp_path / "model.bin"), "--prompt", "ab", "-n", "4")
    finally:
        monkeypatch.delenv(var)
        L.c_library.cache_clear()
    assert rc == 1 and message in err and "Traceback" not in err
