"""The generation loop: KV-cache logits vs full-sequence logits, decoders agree, stops, sampling, streaming text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers_export import sentencepiece_tokenizer

from toolkit import generate as G
from toolkit.models.common import CachedDecoder
from toolkit.models.llama import Config, Model
from toolkit.models.llama_cpu import LlamaCPUDecoder, decode_weights
from toolkit.tokenizers.bytes import BytesTokenizer


def tiny(kv=0, seq=48, seed=0, vocab=200):
    torch.manual_seed(seed)
    return Model(Config(dim=48, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=vocab, max_seq_len=seq)).eval()


@pytest.mark.parametrize("kv", [0, 2, 1])
@pytest.mark.parametrize("decoder", [CachedDecoder, lambda m: LlamaCPUDecoder(decode_weights(m))])
def test_cached_logits_equal_full_sequence(kv, decoder):
    model = tiny(kv)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)[0][0]
        dec = decoder(model)
        got = [dec.logits(ids[0, :12].tolist())]  # a 12-token prompt in one chunk, then one token at a time
        got += [dec.logits(ids[0, :t].tolist()) for t in range(13, 41)]
    got = torch.stack([torch.as_tensor(g) for g in got])
    want = torch.cat([full[11:12], full[12:40]])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got - want).abs().max() < 1e-5


def test_numpy_prefill_of_a_long_prompt_and_of_chunks_after_cached_tokens():
    """The numpy decoder's batched prefill (causal attention over the cache) equals the torch forward: a whole
    100-token prompt, then chunks of 3 and 5 after it, then one token."""
    model = tiny(kv=2, seq=128)
    ids = torch.randint(0, 200, (1, 110), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids)[0][0]
        dec = model.make_decoder()
        got = np.stack([dec.logits(ids[0, :t].tolist()) for t in (100, 103, 108, 109)])
    assert got.dtype == np.float32 and np.abs(got - full[[99, 102, 107, 108]].numpy()).max() < 1e-5


def test_prefix_reuse_and_divergence():
    model = tiny()
    a = list(range(5, 30))
    b = a[:20] + [7, 8, 9]
    with torch.inference_mode():
        dec = G.decoder_for(model)
        dec.logits(a)
        reused = dec.logits(b)  # shares 20 tokens with what is cached, recomputes the rest
        fresh = CachedDecoder(model).logits(b)
        full = model(torch.tensor([b]))[0][0, -1]
    reused = torch.as_tensor(reused)
    assert torch.allclose(reused, fresh, atol=1e-5) and torch.allclose(reused, full, atol=1e-5)


def test_decoders_give_the_same_greedy_tokens():
    model = tiny(kv=2, seq=64)
    greedy = G.Sampling(temperature=0)
    outs = [G.generate(d(model), [1, 5, 6], 50, greedy) for d in (G.WindowDecoder, CachedDecoder, G.decoder_for)]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 50
    assert isinstance(G.decoder_for(model), LlamaCPUDecoder)


class Scripted(nn.Module):
    """A model without a KV cache whose argmax after n tokens is script[n] (tests the loop's rules)."""

    def __init__(self, script, vocab=10, max_seq_len=100):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.config = type("C", (), {"max_seq_len": max_seq_len})()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        n = idx.shape[1]
        logits = torch.zeros(1, n, self.vocab)
        logits[0, -1, self.script[n] if n < len(self.script) else 0] = 5.0
        return logits, None


def test_stops_at_eos_and_bos_and_max_tokens():
    greedy = G.Sampling(temperature=0)
    st = G.Stats()
    assert G.generate(Scripted([0, 4, 5, 6, 2, 7]), [3], 10, greedy, stop_ids=(2, 1), stats=st) == [4, 5, 6]
    assert st.stop == "stop" and st.new_tokens == 3 and st.prompt_tokens == 1
    assert G.generate(Scripted([0, 4, 5, 1, 2]), [3], 10, greedy, stop_ids=(2, 1)) == [4, 5]  # BOS stops, as run.c
    st = G.Stats()
    assert G.generate(Scripted([0, 4, 5, 6, 7, 8]), [3], 3, greedy, stop_ids=(2,), stats=st) == [4, 5, 6]
    assert st.stop == "length"
    assert G.generate(Scripted([0, 4, 5, 6, 2]), [3], 8, greedy) == [4, 5, 6, 2, 0, 0, 0, 0]  # no stop ids


def test_cached_decoder_stops_at_context_and_cuts_long_prompts():
    model = tiny(seq=16)
    st = G.Stats()
    out = G.generate(model, [1, 2, 3, 4], 100, G.Sampling(temperature=0), stats=st)
    assert len(out) == 12 and st.stop == "context"
    st = G.Stats()
    out = G.generate(model, list(range(3, 33)), 5, G.Sampling(temperature=0), stats=st)
    assert st.dropped == 15 and st.prompt_tokens == 15 and len(out) == 1 and st.stop == "context"
    # the window decoder slides instead
    out = G.generate(G.WindowDecoder(model), [1, 2, 3, 4], 30, G.Sampling(temperature=0))
    assert len(out) == 30


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_sampling_rules(kind):
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    logits = torch.from_numpy(logits) if kind == "torch" else logits  # a torch decoder's logits, copied over
    g = G.make_generator(0)
    draw = lambda s, n=4000: np.bincount([G.sample(logits, s, g) for _ in range(n)], minlength=4) / n  # noqa: E731
    assert G.sample(logits, G.Sampling(temperature=0)) == 0
    assert set(np.nonzero(draw(G.Sampling(top_k=1), 50))[0]) == {0}
    freq = draw(G.Sampling(top_k=2))
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 4 / 7) < 0.04
    freq = draw(G.Sampling(top_p=0.5))  # nucleus: 0.4 <= 0.5 < 0.7, so the first two
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 4 / 7) < 0.04
    freq = draw(G.Sampling(top_p=1.0))
    assert np.allclose(freq, [0.4, 0.3, 0.2, 0.1], atol=0.03)
    freq = draw(G.Sampling(temperature=0.5))  # sharper: p^2 renormalised
    assert np.allclose(freq, np.array([16, 9, 4, 1]) / 30, atol=0.03)
    freq = draw(G.Sampling(top_p=0.0))  # 0 = off, as run.c
    assert np.allclose(freq, [0.4, 0.3, 0.2, 0.1], atol=0.03)
    with pytest.raises(ValueError):
        G.Sampling(top_p=1.5)


def test_seed_reproducible():
    model = tiny()
    s = G.Sampling(temperature=1.0, top_p=0.9, seed=123)
    a = G.generate(model, [1], 30, s)
    assert a == G.generate(model, [1], 30, s)
    assert a != G.generate(model, [1], 30, G.Sampling(temperature=1.0, top_p=0.9, seed=124))


def _stream_all(tok, ids, context=()):
    ts = G.TextStream(tok, context)
    pieces = [ts.push(i) for i in ids] + [ts.flush()]
    return pieces


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("tok"))


def test_text_stream_never_splits_characters(sp):
    text = "Lily saw 日本 and a ☃ snowman — ok"
    ids = sp.encode(text)
    assert any(sp.sp.is_byte(i) for i in ids)  # byte fallback is exercised
    pieces = _stream_all(sp, ids)
    assert "".join(pieces) == sp.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    bt = BytesTokenizer(0)
    pieces = _stream_all(bt, bt.encode(text))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_text_stream_keeps_the_space_after_the_prompt(sp):
    prompt, rest = sp.encode("Lily had a"), sp.encode("Lily had a kite")[len(sp.encode("Lily had a")):]
    assert "".join(_stream_all(sp, rest, context=[sp.bos_id] + prompt)) == " kite"
    import tempfile
    from pathlib import Path

    from toolkit.tokenizers.llama2c import Llama2cTokenizer

    with tempfile.TemporaryDirectory() as d:
        sp.save(Path(d))
        lt = Llama2cTokenizer.from_file(Path(d) / "tokenizer.bin", sp.vocab_size)
    ids = lt.encode("Lily had a kite 日本")
    assert "".join(_stream_all(lt, ids[3:], context=[1] + ids[:3])) == lt.decode(ids)[len(lt.decode(ids[:3])):]
    assert "".join(_stream_all(lt, ids, context=[1])) == "Lily had a kite 日本"


def test_stats_rates():
    st = G.Stats(prompt_tokens=3, new_tokens=11, prefill_seconds=0.5, seconds=1.5)
    assert st.tokens_per_s == pytest.approx(11 / 1.5) and st.decode_tokens_per_s == pytest.approx(10.0)


def test_decoder_choice_goes_by_the_model_protocol():
    model = tiny()
    assert isinstance(model.make_decoder(), LlamaCPUDecoder)  # CPU, fp32: the numpy step
    half = tiny().to(torch.bfloat16)
    assert half.make_decoder() is None and type(G.decoder_for(half)) is CachedDecoder
    assert type(G.decoder_for(Scripted([0]))) is G.WindowDecoder  # a bare nn.Module: no cache


def test_numpy_decoders_share_one_copy_of_the_weights_until_the_weights_change():
    """The numpy step reads a copy of the weights (stacked, transposed): decoders of one model share it, and a
    decoder made after an optimizer step (the trainer's samples at evals) sees the new weights."""
    model = tiny(kv=2)
    ids = list(range(3, 20))
    a, b = model.make_decoder(), model.make_decoder()
    assert a.w is b.w and model.make_batch_decoder().w is a.w
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    x = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, x)[1].backward()
    opt.step()
    c = model.make_decoder()
    assert c.w is not a.w
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0][0, -1]
    assert np.abs(c.logits(ids) - full.numpy()).max() < 1e-5


def test_numpy_decoder_is_deterministic():
    """No thread tuning or timing: the same prompt gives the same logits, bit for bit, on every run; after a
    cached prefix (a chat's next turn) they agree to float32 rounding (a 22-token chunk's products are summed in
    another order than a 27-token prompt's)."""
    model = tiny(kv=2)
    ids = list(range(3, 30))
    with torch.inference_mode():
        runs = [np.stack([model.make_decoder().logits(ids[:t]) for t in (5, 27)]) for _ in range(2)]
        dec = model.make_decoder()
        again = np.stack([dec.logits(ids[:t]) for t in (5, 27)])
    assert np.array_equal(runs[0], runs[1]) and np.abs(runs[0] - again).max() < 1e-5


def test_stop_text_one_or_several_stops():
    s = G.StopText("\nQ:")  # one string, as the REPL's template stop
    assert [s.feed(p) for p in ["Max is", " here.\n", "Q", ": next"]] == ["Max is", " here.", "", ""]
    assert s.stopped and s.text == "Max is here." and s.flush() == ""
    s = G.StopText(["END", "xy"])  # several, as a request's `stop`: the earliest wins
    assert s.feed("axEND") == "ax" and s.stopped and s.text == "ax"
    s = G.StopText(None)
    assert s.feed("abc") == "abc" and s.flush() == "" and not s.stopped
    s = G.StopText(["END", "ENX"])
    assert s.feed("aEN") == "a" and s.feed("Y") == "ENY" and s.text == "aENY"
