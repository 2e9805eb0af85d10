import math

import pytest
import torch

from toolkit import models
from toolkit.models.llama import Config, apply_rope, rope_tables


def tiny(**kw):
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16, multiple_of=8)
    cfg.update(kw)
    torch.manual_seed(0)
    return models.build(Config(**cfg))


def test_shapes_and_backward():
    m = tiny()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = m(x, x)
    assert logits.shape == (3, 16, 50) and loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.output.weight is m.tok_embeddings.weight  # tied, as llama2.c
    assert tiny(tie_embeddings=False).output.weight is not tiny().tok_embeddings.weight


def test_llama2c_hidden_dim_init_and_param_count():
    assert Config(dim=288).ffn_dim == 768 and Config(dim=512, n_heads=8).ffn_dim == 1376 and Config(dim=768, n_heads=12).ffn_dim == 2048
    assert Config(dim=64, n_heads=8, multiple_of=4).ffn_dim == 172
    m = models.build(Config(dim=288, n_layers=6, n_heads=6, vocab_size=32000))
    assert abs(m.num_params() - 15.19e6) < 0.01e6  # llama2.c's stories15M
    std = m.layers[0].attention.wo.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(12)) < 0.001
    assert abs(m.layers[0].attention.wq.weight.std().item() - 0.02) < 0.001


def test_rope_rotates_interleaved_pairs_like_run_c():
    head_dim, T = 8, 5
    cos, sin = rope_tables(head_dim, T, 10000.0)
    x = torch.randn(1, 1, T, head_dim)
    out = apply_rope(x, cos, sin)
    for pos in range(T):  # run.c: for i in 0, 2, 4...: freq = 1 / 10000^(i / head_size); rotate (x[i], x[i+1])
        for i in range(0, head_dim, 2):
            theta = pos / (10000.0 ** (i / head_dim))
            a, b = x[0, 0, pos, i].item(), x[0, 0, pos, i + 1].item()
            assert out[0, 0, pos, i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-5)
            assert out[0, 0, pos, i + 1].item() == pytest.approx(a * math.sin(theta) + b * math.cos(theta), abs=1e-5)


def test_causal_no_future_leakage():
    m = tiny().eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    assert torch.allclose(m(x)[0][0, :10], m(y)[0][0, :10], atol=1e-6)
    assert not torch.allclose(m(x)[0][0, 10:], m(y)[0][0, 10:])


def test_kv_cache_equals_full_sequence():
    m = tiny().eval()
    x = torch.randint(0, 50, (2, 12))
    full = m(x)[0]
    cache = m.new_cache(2)
    parts = [m(x[:, :5], cache=cache, pos=0)[0]] + [m(x[:, i : i + 1], cache=cache, pos=i)[0] for i in range(5, 9)]
    parts.append(m(x[:, 9:], cache=cache, pos=9)[0])
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_tiny_model_overfits_a_fixed_batch():
    m = tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (4, 16))
    first = None
    for _ in range(150):
        _, loss = m(x[:, :-1], x[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.1


def test_flops_per_token_matches_palm_formula():
    m = tiny()
    c = m.config
    assert m.flops_per_token() == 6 * m.num_params() + 12 * c.n_layers * c.n_heads * c.head_dim * c.max_seq_len


def test_build_hands_token_strings_to_the_families_that_take_them(monkeypatch):
    import sys
    import types

    from toolkit.models import gpt2

    rhymes = {"cat": "AE1 T", "hat": "AE1 T"}
    fake = types.SimpleNamespace(phones_for_word=lambda w: [rhymes[w]] if w in rhymes else [],
                                 rhyming_part=lambda phones: phones)
    monkeypatch.setitem(sys.modules, "pronouncing", fake)
    strings = [" cat", " hat", " sun"] + [f"<{i}>" for i in range(47)]
    cfg = gpt2.Config(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=16, resonance=True,
                      rhyme_init=True, phase_init_std=1.0)
    torch.manual_seed(0)
    w = models.build(cfg, token_strings=strings).phase.weight
    assert (w[0] - w[1]).abs().max() < 0.5 and (w[0] - w[2]).abs().max() > 0.5  # cat and hat share a base
    torch.manual_seed(0)
    plain = models.build(cfg).phase.weight  # no strings: the random init
    assert (plain[0] - plain[1]).abs().max() > 0.5
    assert tiny().config.family == "llama" and models.build(tiny().config, token_strings=strings) is not None


def test_no_protocol_method_hides_a_family_attribute():
    """A LanguageModel method with the name of a family's submodule (gpt2's `blocks`) would hide that submodule:
    attribute lookup finds the class's method before nn.Module's registry."""
    import inspect

    from toolkit import recipe as recipe_lib
    from toolkit.models.base import LanguageModel

    protocol = {n for n, _ in inspect.getmembers(LanguageModel) if not n.startswith("_")} - \
        {n for n, _ in inspect.getmembers(torch.nn.Module)}
    for name in ("stories260k", "gpt2_baseline", "resonance", "pgpt_lformer_cpu", "attractor_a1"):
        cfg = recipe_lib.load(name).model
        from dataclasses import replace

        model = models.build(replace(cfg, vocab_size=cfg.vocab_size or 256))
        registered = set(model._modules) | set(model._parameters) | set(model._buffers)
        assert not protocol & registered, (name, protocol & registered)


def test_a_model_built_to_be_loaded_skips_its_random_init_and_nothing_else(tmp_path):
    """models.build(init=False): no random init (the weights are loaded next), the same model once loaded, the
    init functions back afterwards, and the RNG untouched."""
    from toolkit.export.llama2c import export_model, load_model

    before = tiny()
    m = tiny(tie_embeddings=False)
    export_model(m, tmp_path / "m.bin", 0)
    state = torch.get_rng_state()
    _, loaded = load_model(tmp_path / "m.bin")  # built with init=False
    assert torch.equal(torch.get_rng_state(), state)  # no draws: nothing was initialised at random
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(loaded(x)[0], m.eval()(x)[0])
    after = tiny()  # init is back: the seed-0 model of before, draw for draw
    assert all(torch.equal(a, b) for a, b in zip(after.state_dict().values(), before.state_dict().values()))


def test_a_model_built_on_another_thread_during_a_load_keeps_its_random_init(monkeypatch):
    """A build with init=False swaps torch.nn.init's fills process-wide while it runs; a build with init on
    another thread at that moment (a server loading a second model) waits for it and is initialised as usual."""
    import threading

    reference = tiny()
    inside, release = threading.Event(), threading.Event()
    real_model = models.module("llama").Model

    class SlowModel(real_model):  # a model that is loaded (init=False) slowly: held inside its build
        def __init__(self, config):
            super().__init__(config)
            if config.vocab_size == 51:
                inside.set()
                release.wait(10)

    monkeypatch.setattr(models.module("llama"), "Model", SlowModel)
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, multiple_of=8)
    loading = threading.Thread(target=models.build, args=(Config(vocab_size=51, **cfg),), kwargs={"init": False})
    loading.start()
    assert inside.wait(10)
    built = []
    other = threading.Thread(target=lambda: built.append(tiny()))
    other.start()
    other.join(0.5)  # gives an unguarded build time to run inside the swapped fills
    release.set()
    loading.join(10)
    other.join(10)
    assert all(torch.equal(a, b) for a, b in zip(built[0].state_dict().values(), reference.state_dict().values()))
