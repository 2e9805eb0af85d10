"""The one generation loop: a decoder gives next-token logits, `sample` picks a token, `stream` yields them.

A decoder is an object with `logits(ids)` (the next-token logits after `ids`), `max_len` and `sliding`.
`decoder_for(model)` picks one through the model protocol (toolkit.models.base):
- the family's own, `model.make_decoder()` (llama on CPU: a numpy one-token step, toolkit.models.llama_cpu);
- `CachedDecoder` (toolkit.models.common): models with a KV cache (`new_cache`). Work for a prompt prefix
  already in the cache is reused, so a chat turn only runs its new tokens;
- `WindowDecoder`: any other causal model: recompute over the last max_seq_len tokens each step.

Sampling is numpy on (V,) float32 logits, whatever the decoder returns (a torch tensor on any device is copied
over), with a numpy random Generator; this module imports torch only for a torch model, so a numpy decoder
(llama_cpu.NumpyLlama: `lmkit chat` without PyTorch's import) generates without it.

`TextStream` turns the token stream into text pieces that never split a UTF-8 character (byte-fallback
pieces can carry half of one); `StopText` ends that text before the first of some stop strings (a chat
template's "\nQ:", a request's `stop`), for the REPL and the server alike.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 0 or 1 = off (as run.c); run.c's default is 0.9
    seed: int | None = None  # None = from the clock
    repeat_penalty: float = 0.0  # subtracted from the logits of each of the last `repeat_last_n` generated ids
    repeat_last_n: int = 4
    last_token_penalty: float = 0.0  # subtracted again from the very last generated id (BoggersTheLLM's sampler)

    def __post_init__(self):
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (0 or 1 = off), got {self.top_p}")
        if self.repeat_penalty < 0 or self.last_token_penalty < 0 or self.repeat_last_n < 0:
            raise ValueError("repeat penalties and repeat_last_n must be >= 0")


def penalize(logits: np.ndarray, generated: Sequence[int], s: Sampling) -> np.ndarray:
    """Subtractive repeat penalties on (V,) logits: `repeat_penalty` once per occurrence among the last
    `repeat_last_n` generated ids, `last_token_penalty` more on the very last one."""
    if not generated or not (s.repeat_penalty or s.last_token_penalty):
        return logits
    out = np.array(logits, dtype=np.float32)
    recent = list(generated[-s.repeat_last_n :]) if s.repeat_last_n else []
    if s.repeat_penalty and recent:
        np.subtract.at(out, recent, np.float32(s.repeat_penalty))
    out[generated[-1]] -= s.last_token_penalty
    return out


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # until the first new token
    seconds: float = 0.0  # total
    stop: str = ""  # "stop" (EOS/BOS), "length" (max new tokens), "context" (max_seq_len), "interrupted"
    dropped: int = 0  # prompt tokens cut from the left to fit the context

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prefill included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """As run.c reports it: the tokens after the first, over the time after the first."""
        t = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / t if self.new_tokens > 1 and t > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# decoders


class WindowDecoder:
    """Recompute over the last `max_len` tokens for each new token (models without a KV cache)."""

    sliding = True

    def __init__(self, model):
        self.model = model
        self.max_len = model.config.max_seq_len
        self.device = next(model.parameters()).device

    def logits(self, ids: Sequence[int]):
        import torch

        idx = torch.tensor([list(ids[-self.max_len:])], dtype=torch.long, device=self.device)
        out = self.model(idx)
        out = out[0] if isinstance(out, tuple) else out
        return out[0, -1]


def _torch_module(model) -> bool:
    torch = sys.modules.get("torch")  # not loaded: nothing can be a torch module
    return torch is not None and isinstance(model, torch.nn.Module)


def decoder_for(model):
    """The model's own decoder (`make_decoder()`), else a CachedDecoder if it has a KV cache (`new_cache`), else
    a WindowDecoder. A torch module that is not a LanguageModel has the protocol's defaults: no cache. A model
    that is not a torch module (llama_cpu.NumpyLlama) makes its own."""
    if not _torch_module(model):
        return model.make_decoder()
    from toolkit.models.base import LanguageModel
    from toolkit.models.common import CachedDecoder

    model.eval()
    if not isinstance(model, LanguageModel):
        return WindowDecoder(model)
    dec = model.make_decoder()
    if dec is not None:
        return dec
    if model.new_cache(1, 1) is not None:  # a one-position cache: cheap to make, says whether there is one
        return CachedDecoder(model)
    return WindowDecoder(model)


# ---------------------------------------------------------------------------------------------------------
# sampling


def as_logits(x) -> np.ndarray:
    """A decoder's (V,) logits as float32 numpy: a torch tensor (any device, any dtype) is copied to the CPU."""
    if isinstance(x, np.ndarray):
        return x
    return x.detach().float().cpu().numpy()


def sample(logits, s: Sampling, generator: np.random.Generator | None = None) -> int:
    """Pick the next token from (V,) logits: argmax at temperature 0, else softmax(logits / T) restricted to the
    top k, then to the smallest set of the most likely tokens whose probability reaches top_p (nucleus), then one
    draw, as run.c's sample_mult: the first id whose running sum of probabilities passes a uniform number.
    Only values are sorted, to find each cut, never (value, id) pairs: for 32,000 values an argsort took 1.3-4 ms
    on a 2-core AMD EPYC, a sort of the values 0.25 ms."""
    logits = as_logits(logits)
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits / np.float32(s.temperature)
    ids = None
    if 0 < s.top_k < z.size:
        ids = np.flatnonzero(z >= np.partition(z, z.size - s.top_k)[z.size - s.top_k])  # ties at the k-th kept
        z = z[ids]
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if 0 < s.top_p < 1:
        # tokens under (1 - p) / (n - 1) cannot be in the nucleus (run.c's trick): sort only the rest
        cand = np.flatnonzero(probs >= (1.0 - s.top_p) / max(probs.size - 1, 1))
        top = np.sort(probs[cand])[::-1]
        cut = top[min(int(np.searchsorted(np.cumsum(top), s.top_p)), top.size - 1)]
        keep = cand[probs[cand] >= cut]
        ids = keep if ids is None else ids[keep]
        probs = probs[keep]
    generator = generator if generator is not None else np.random.default_rng()
    cdf = np.cumsum(probs)
    choice = min(int(np.searchsorted(cdf, generator.random() * cdf[-1], side="right")), probs.size - 1)
    return int(ids[choice]) if ids is not None else choice


def make_generator(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed if seed is not None else time.time_ns() % (2**63))


def _inference_mode():
    torch = sys.modules.get("torch")  # a torch decoder means torch is loaded; a numpy one needs nothing
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# the loop


def stream(model_or_decoder, prompt_ids: Sequence[int], max_new_tokens: int = 256, sampling: Sampling = Sampling(),
           stop_ids: Sequence[int] = (), stats: Stats | None = None,
           generator: np.random.Generator | None = None) -> Iterator[int]:
    """Yield new token ids after `prompt_ids`, one forward each (of the decoder given, or the model's
    `decoder_for`), until a stop id (not yielded), max_new_tokens or, for a KV-cache model, the end of its
    context. A prompt longer than the context is cut from the left. `stats` (if given) is filled in as it goes;
    closing the generator early records "interrupted"."""
    is_decoder = callable(getattr(model_or_decoder, "logits", None))  # a model (torch, or NumpyLlama) has none
    dec = model_or_decoder if is_decoder else decoder_for(model_or_decoder)
    stats = stats if stats is not None else Stats()
    generator = generator if generator is not None else make_generator(sampling.seed)
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("generation needs at least one prompt token (e.g. BOS)")
    if len(ids) >= dec.max_len and not dec.sliding:
        stats.dropped = len(ids) - (dec.max_len - 1)
        ids = ids[stats.dropped :]
    stats.prompt_tokens, stats.new_tokens, stats.stop = len(ids), 0, "interrupted"
    stops = set(stop_ids)
    t0 = time.perf_counter()
    try:
        while True:
            if stats.new_tokens >= max_new_tokens:
                stats.stop = "length"
                break
            if not dec.sliding and len(ids) >= dec.max_len:
                stats.stop = "context"
                break
            with _inference_mode():  # not around the yield: the caller's code runs outside it
                logits = penalize(as_logits(dec.logits(ids)), ids[stats.prompt_tokens :], sampling)
                nxt = sample(logits, sampling, generator)
            if stats.new_tokens == 0:
                stats.prefill_seconds = time.perf_counter() - t0
            if nxt in stops:
                stats.stop = "stop"
                break
            ids.append(nxt)
            stats.new_tokens += 1
            stats.seconds = time.perf_counter() - t0
            yield nxt
    finally:
        stats.seconds = time.perf_counter() - t0


def generate(model_or_decoder, prompt_ids: Sequence[int], max_new_tokens: int = 256,
             sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (), stats: Stats | None = None) -> list[int]:
    return list(stream(model_or_decoder, prompt_ids, max_new_tokens, sampling, stop_ids, stats))


def stop_ids_for(tok) -> tuple[int, ...]:
    """EOS, and BOS as run.c does (BOS-delimited training data: a BOS means a new document)."""
    return tuple(i for i in (tok.eos_id, tok.bos_id) if i is not None)


# ---------------------------------------------------------------------------------------------------------
# text


class TextStream:
    """Incremental detokenization: `push(id)` returns the new text (possibly ""), never half a character.

    It decodes a short window of recent tokens and emits what grew, holding text back while it ends in
    U+FFFD (an incomplete byte sequence). `context` is the prompt, so the first new token keeps its
    leading space exactly as a full decode would have it.
    """

    def __init__(self, tok, context: Sequence[int] = (), hold_max: int = 8):
        self.tok = tok
        self.ids = list(context[-2:])
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # tokens up to here are already emitted
        self.hold_max = hold_max

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and len(self.ids) - self.read < self.hold_max):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


class StopText:
    """Stop strings on generated text: `feed(piece)` passes text on until one of `stops` appears (it and what
    follows are dropped, `stopped` turns True), and never passes on a tail that could be the start of one (held
    back until it clearly is not; `flush()` gives it at the end). `text` is everything passed on so far."""

    def __init__(self, stops: str | Sequence[str] | None = ()):
        stops = (stops,) if isinstance(stops, str) else (stops or ())
        self.stops = [s for s in stops if s]
        self.pending, self.text, self.stopped = "", "", False

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        buf = self.pending + piece
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.pending = True, ""
            return self._emit(buf[: min(cuts)])
        hold = max((self._partial(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - hold :]
        return self._emit(buf[: len(buf) - hold])

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return self._emit(out)

    def _emit(self, out: str) -> str:
        self.text += out
        return out

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of `stop`."""
        for k in range(min(len(stop) - 1, len(buf)), 0, -1):
            if buf.endswith(stop[:k]):
                return k
        return 0
