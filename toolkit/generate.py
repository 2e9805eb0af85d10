"""The one generation loop: a decoder gives next-token logits, `sample` picks a token, `stream` yields them.

Decoders (`decoder_for(model)`):
- `CachedDecoder`: models with `new_cache` (KV cache). Work for a prompt prefix already in the cache is
  reused, so a chat turn only runs its new tokens.
- `LlamaCPUDecoder`: the same for toolkit.models.llama on CPU at batch 1, with the one-token step done in
  numpy on the model's own weights and cache (no copies). PyTorch's per-op overhead and MKL's gemv on
  AMD CPUs made the torch step 2.5-3x slower than run.c; this one is on a par with it, both bound by
  memory bandwidth (benchmarks/generate.py).
- `WindowDecoder`: any other causal model: recompute over the last max_seq_len tokens each step.

`TextStream` turns the token stream into text pieces that never split a UTF-8 character (byte-fallback
pieces can carry half of one).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch


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


def penalize(logits: torch.Tensor, generated: Sequence[int], s: Sampling) -> torch.Tensor:
    """Subtractive repeat penalties on (V,) logits: `repeat_penalty` once per occurrence among the last
    `repeat_last_n` generated ids, `last_token_penalty` more on the very last one."""
    if not generated or not (s.repeat_penalty or s.last_token_penalty):
        return logits
    out = logits.clone()
    recent = list(generated[-s.repeat_last_n :]) if s.repeat_last_n else []
    if s.repeat_penalty and recent:
        idx = torch.tensor(recent, device=out.device)
        out.index_put_((idx,), torch.full((len(recent),), -s.repeat_penalty, dtype=out.dtype, device=out.device),
                       accumulate=True)
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


def _common_prefix(a: list[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == list(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class WindowDecoder:
    """Recompute over the last `max_len` tokens for each new token (models without a KV cache)."""

    sliding = True

    def __init__(self, model):
        self.model = model
        self.max_len = model.config.max_seq_len
        self.device = next(model.parameters()).device

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        idx = torch.tensor([list(ids[-self.max_len:])], dtype=torch.long, device=self.device)
        out = self.model(idx)
        out = out[0] if isinstance(out, tuple) else out
        return out[0, -1]


class CachedDecoder:
    """A KV cache of max_seq_len positions; `logits(ids)` runs only what is not in the cache yet."""

    sliding = False

    def __init__(self, model):
        self.model = model
        self.max_len = model.config.max_seq_len
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(1, self.max_len)
        self.done: list[int] = []  # the tokens whose keys and values are in the cache

    def _forward(self, new: list[int], pos: int) -> torch.Tensor:
        idx = torch.tensor([new], dtype=torch.long, device=self.device)
        return self.model(idx, cache=self.cache, pos=pos)[0][0, -1]

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        if len(ids) > self.max_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_len}")
        n = min(_common_prefix(self.done, ids), len(ids) - 1)
        self.done = self.done[:n]  # an interrupted forward leaves positions >= n half-written
        out = self._forward(list(ids[n:]), n)
        self.done = list(ids)
        return out


class _BlasThreads:
    """Sets the thread count of numpy's bundled OpenBLAS (a no-op where it is not found). The small per-layer
    products run on one thread: waking workers for each costs more than it saves, and on a busy machine it
    made the whole step 3.5x slower. The vocabulary-sized product is tuned (TunedProduct). The setting is
    process-wide and is left as the decoder last set it (switching back and forth costs too)."""

    def __init__(self):
        self.set = self.get = None
        self.default = 0
        try:
            import ctypes

            libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
            for path in sorted(libdir.glob("lib*openblas*.so*")):
                lib = ctypes.CDLL(str(path))
                for prefix in ("scipy_openblas", "openblas"):
                    for suffix in ("64_", ""):
                        setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                        getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                        if setter is not None and getter is not None:
                            self.set, self.get = setter, getter
                            self.default = self.current = int(getter())
                            return
        except (OSError, AttributeError, ValueError):
            pass

    def __call__(self, n: int) -> None:
        if self.set is not None and n != self.current:
            self.set(n)
            self.current = n

    def tuned(self) -> TunedProduct:
        return TunedProduct(self)


_BLAS: _BlasThreads | None = None


def blas_threads() -> _BlasThreads:
    """The process's one _BlasThreads, made before any decoder changed the count (its `default`)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = _BlasThreads()
    return _BLAS


class TunedProduct:
    """`w @ x` on 1 or the default number of BLAS threads: every RETUNE calls, a few calls on each are timed and
    the default is kept only if clearly faster (a busy core makes extra threads far slower, an idle one makes
    them somewhat faster, so the choice leans to one thread and is revisited as the load changes)."""

    TRIALS, RETUNE, MARGIN = 3, 256, 0.8

    def __init__(self, blas: _BlasThreads):
        self.blas = blas
        self.options = (1, blas.default) if blas.set is not None and blas.default > 1 else ()
        self.calls = 0
        self.threads = 0 if not self.options else None
        self.times: dict[int, list[float]] = {n: [] for n in self.options}

    def __call__(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.options and self.calls % self.RETUNE == 0:
            self.threads, self.times = None, {n: [] for n in self.options}
        if self.threads is not None:
            if self.threads:
                self.blas(self.threads)
            return w @ x
        n = min(self.times, key=lambda k: len(self.times[k]))  # alternate until each has TRIALS timings
        self.blas(n)
        t0 = time.perf_counter()
        out = w @ x
        self.times[n].append(time.perf_counter() - t0)
        if all(len(t) >= self.TRIALS for t in self.times.values()):
            one, many = min(self.times[1]), min(self.times[self.blas.default])
            self.threads = self.blas.default if many < self.MARGIN * one else 1
        return out


class LlamaCPUDecoder(CachedDecoder):
    """CachedDecoder for toolkit.models.llama on CPU, fp32, batch 1: one-token steps run in numpy on views of
    the model's weights and KV cache. Prompts of more than NUMPY_PREFILL tokens go through the model's own
    forward in one batch; shorter ones token by token in numpy (the first PyTorch matmul of a process costs
    a second of MKL start-up on a busy machine, more than a short prompt)."""

    NUMPY_PREFILL = 64

    def __init__(self, model):
        super().__init__(model)
        c = model.config
        self.c = c
        self.rep = c.n_heads // c.kv_heads
        self.scale = 1.0 / math.sqrt(c.head_dim)

        def w(t):
            return t.detach().numpy()

        self.emb, self.norm, self.wcls = w(model.tok_embeddings.weight), w(model.norm.weight), w(model.output.weight)
        self.layers = []
        for i, b in enumerate(model.layers):
            a, f = b.attention, b.feed_forward
            self.layers.append((w(b.attention_norm.weight), w(a.wq.weight), w(a.wk.weight), w(a.wv.weight),
                                w(a.wo.weight), w(b.ffn_norm.weight), w(f.w1.weight), w(f.w2.weight),
                                w(f.w3.weight), self.cache.k[i][0].numpy(), self.cache.v[i][0].numpy()))
        angles = model.rope_cos.numpy() + 1j * model.rope_sin.numpy()
        self.rope = angles.astype(np.complex64)  # (max_len, head_dim/2): x[2i] + i x[2i+1] times this
        self.eps = float(c.norm_eps)
        self.blas = blas_threads()
        self.classifier = self.blas.tuned()

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x * weight * (1.0 / math.sqrt(float(np.dot(x, x)) / x.size + self.eps))

    def _forward(self, new: list[int], pos: int) -> torch.Tensor:
        if len(new) > self.NUMPY_PREFILL:
            return super()._forward(new, pos)
        for i, token in enumerate(new[:-1]):
            self._step(token, pos + i, logits=False)
        return self._step(new[-1], pos + len(new) - 1)

    def _step(self, token: int, pos: int, logits: bool = True) -> torch.Tensor | None:
        c, rep, hd = self.c, self.rep, self.c.head_dim
        rope = self.rope[pos]
        x = self.emb[token].copy()
        self.blas(1)
        for an, wq, wk, wv, wo, fn, w1, w2, w3, kc, vc in self.layers:
            xb = self._rms(x, an)
            q = ((wq @ xb).view(np.complex64).reshape(c.n_heads, -1) * rope).view(np.float32)
            k = ((wk @ xb).view(np.complex64).reshape(c.kv_heads, -1) * rope).view(np.float32)
            kc[:, pos] = k
            vc[:, pos] = (wv @ xb).reshape(c.kv_heads, hd)
            q = q.reshape(c.kv_heads, rep, hd)  # query head h uses key/value head h // rep
            att = np.matmul(q, kc[:, : pos + 1].transpose(0, 2, 1))  # (kv_heads, rep, pos + 1)
            att = np.exp((att - att.max(axis=-1, keepdims=True)) * self.scale)
            att /= att.sum(axis=-1, keepdims=True)
            y = np.matmul(att, vc[:, : pos + 1]).reshape(-1)
            x += wo @ y
            xb = self._rms(x, fn)
            h = w1 @ xb
            x += w2 @ (h / (np.float32(1.0) + np.exp(-h)) * (w3 @ xb))
        if not logits:
            return None
        return torch.from_numpy(self.classifier(self.wcls, self._rms(x, self.norm)))


def decoder_for(model):
    """The fastest decoder this model supports; a family may bring its own (`model.make_decoder()`, an object
    with `logits(ids)`, `max_len` and `sliding`)."""
    model.eval()
    if hasattr(model, "make_decoder"):
        return model.make_decoder()
    if not hasattr(model, "new_cache"):
        return WindowDecoder(model)
    p = next(model.parameters())
    if (getattr(model.config, "family", None) == "llama" and p.device.type == "cpu" and p.dtype == torch.float32
            and type(model).__module__ == "toolkit.models.llama"):
        return LlamaCPUDecoder(model)
    return CachedDecoder(model)


# ---------------------------------------------------------------------------------------------------------
# sampling


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> int:
    """Pick the next token from (V,) logits: argmax at temperature 0, else softmax(logits / T) restricted to the
    top k, then to the smallest set whose probability exceeds top_p (nucleus), then a multinomial draw."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / s.temperature, dim=-1)
    ids = None
    if 0 < s.top_k < probs.numel():
        probs, ids = torch.topk(probs, s.top_k)
        probs = probs / probs.sum()
    if 0 < s.top_p < 1:
        if ids is None:
            # tokens under (1 - p) / (V - 1) cannot be in the nucleus (run.c's trick): sort only the rest
            ids = torch.nonzero(probs >= (1.0 - s.top_p) / max(probs.numel() - 1, 1)).squeeze(1)
            probs, order = torch.sort(probs[ids], descending=True)
            ids = ids[order]
        keep = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor([s.top_p])).item()) + 1
        probs, ids = probs[:keep], ids[:keep]
    choice = int(torch.multinomial(probs, 1, generator=generator).item())
    return int(ids[choice]) if ids is not None else choice


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else time.time_ns() % (2**63))
    return g


# ---------------------------------------------------------------------------------------------------------
# the loop


def stream(model_or_decoder, prompt_ids: Sequence[int], max_new_tokens: int = 256, sampling: Sampling = Sampling(),
           stop_ids: Sequence[int] = (), stats: Stats | None = None,
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids after `prompt_ids`, one forward each, until a stop id (not yielded), max_new_tokens
    or, for a KV-cache model, the end of its context. A prompt longer than the context is cut from the left.
    `stats` (if given) is filled in as it goes; closing the generator early records "interrupted"."""
    dec = model_or_decoder if hasattr(model_or_decoder, "logits") else decoder_for(model_or_decoder)
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
            with torch.inference_mode():  # not around the yield: the caller's code runs outside it
                logits = penalize(dec.logits(ids), ids[stats.prompt_tokens :], sampling)
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
