"""One worker thread owns the model and decodes every active request, one token each per round.

Each job (one choice of one request) has its own decoder, so its own KV cache: no job sees another's tokens,
and a job's state is dropped when it ends. Jobs join the round when a slot is free (at most `max_active` decode
side by side; the rest wait in order) and leave when they finish, are cancelled (the client went away) or pass
their deadline. Every job's tokens come from `generate.stream`, the one loop, with its own sampling.

Batched (a model whose make_batch_decoder() gives one: llama on CPU, fp32): a round is ONE forward for every job past its prompt
(`LlamaBatch.step`, each row at its own position over its own cache), whose logits rows are then handed to each
job's `generate.stream` through its `_Slot` decoder; a new job's prompt runs on its own decoder, in one batched
pass, in its first round. Other models are interleaved: a round is one `generate.stream` step per job, so 8 streams each get about
1/8 of the single-stream speed. Either way a long prompt's prefill holds the round up while it runs.

Events go back through each job's `emit` (called on the worker thread; the API hands them to its event loop).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from toolkit import generate as G


@dataclass
class Event:
    index: int  # the choice
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" once the choice is done
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""  # the choice failed; `status` is the HTTP status to report
    status: int = 0


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: G.Sampling
    emit: Callable[[Event], None]
    stop_texts: tuple[str, ...] = ()
    strip_lead: bool = False  # a chat answer's first piece carries the tokenizer's dummy-prefix space
    index: int = 0
    deadline: float = float("inf")  # time.monotonic()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class _Slot:
    """A job's decoder when batching: `logits(ids)` hands over the row the batched step computed for exactly these
    ids (`pending`), else (the prompt, or after a failed batched step) runs the job's own decoder.

    The prompt always runs on the job's own decoder, in one batched pass: fed through the round a token at a time,
    a 49-token prompt waited 49 rounds for its first token (time to first token 130-170 ms against 21 ms, one
    client; docs/serve.md)."""

    sliding = False

    def __init__(self, dec):
        self.dec, self.max_len = dec, dec.max_len
        self.last: int | None = None  # the token just yielded: the batched step feeds it next round
        self.pending: tuple[int, np.ndarray] | None = None

    def logits(self, ids):
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == len(ids) and self.dec.done[-1] == ids[-1]:
            return pending[1]
        return self.dec.logits(ids)


class _Running:
    """A job on the worker: its token stream and text state."""

    def __init__(self, job: Job, model, tok, stop_ids, batch):
        self.job = job
        self.stats = G.Stats()
        self.slot = _Slot(batch.new_decoder()) if batch is not None else None
        self.gen = G.stream(self.slot or G.decoder_for(model), job.prompt_ids, job.max_tokens, job.sampling,
                            stop_ids, self.stats)
        self.text = G.TextStream(tok, job.prompt_ids)
        self.stops = G.StopText(job.stop_texts)
        self.lead = job.strip_lead


class Scheduler:
    def __init__(self, model, tokenizer, max_active: int = 16, batch: bool = True):
        self.model, self.tok, self.max_active = model, tokenizer, max_active
        model.eval()
        self.batch = model.make_batch_decoder() if batch else None
        self.stop_ids = G.stop_ids_for(tokenizer)
        self.waiting: deque[Job] = deque()
        self.active: list[_Running] = []
        self.wake = threading.Condition()
        self.closed = False
        self.tokens_generated = 0
        self.thread = threading.Thread(target=self._loop, name="lmkit-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self.wake:
            self.waiting.extend(jobs)
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=5)

    @property
    def counts(self) -> tuple[int, int]:
        return len(self.active), len(self.waiting)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.active and not self.waiting and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
                starting = []
                while self.waiting and len(self.active) + len(starting) < self.max_active:
                    starting.append(self.waiting.popleft())
            for job in starting:
                self._start(job)
            if self.batch is not None:
                self._batch_step()
            for run in list(self.active):
                if not self._advance(run):
                    self.active.remove(run)
                    run.gen.close()  # frees the decoder and its cache with the run

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            self.active.append(_Running(job, self.model, self.tok, self.stop_ids, self.batch))
        except Exception as e:  # noqa: BLE001 - a bad job must not stop the worker
            self._fail(job, e)

    def _advance(self, run: _Running) -> bool:
        """One token for `run`; False when it is over."""
        job = run.job
        if job.cancelled.is_set():
            return False
        if time.monotonic() > job.deadline:
            job.emit(Event(job.index, error="the request timed out (lmkit serve --timeout)", status=408))
            return False
        try:
            token = next(run.gen)
        except StopIteration:
            tail = run.text.flush()
            text = run.stops.feed(self._lead(run, tail)) + run.stops.flush()
            self._finish(run, text, "length" if run.stats.stop in ("length", "context") else "stop")
            return False
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)
            return False
        self.tokens_generated += 1
        if run.slot is not None:
            run.slot.last = token
        piece = run.stops.feed(self._lead(run, run.text.push(token)))
        if run.stops.stopped:
            self._finish(run, piece, "stop")
            return False
        if piece:
            job.emit(Event(job.index, text=piece))
        return True

    def _batch_step(self) -> None:
        """One forward for every job that will ask for its next logits (it has yielded a token); each gets its row."""
        rows, tokens = [], []
        for run in self.active:
            slot = run.slot
            if slot is None or run.job.cancelled.is_set() or slot.last is None:
                continue
            # generate.stream asks for logits next unless the job is at max_tokens or the end of the context
            if run.stats.new_tokens < run.job.max_tokens and len(slot.dec.done) + 1 < slot.max_len:
                rows.append(slot)
                tokens.append(slot.last)
            slot.last = None
        if not rows:
            return
        try:
            logits = self.batch.step([r.dec for r in rows], tokens, [len(r.dec.done) for r in rows])
        except Exception as e:  # noqa: BLE001 - each job then runs its own decoder, which redoes the position
            traceback.print_exception(e, file=sys.stderr)
            return
        for i, (r, token) in enumerate(zip(rows, tokens)):
            r.dec.done.append(token)
            r.pending = (len(r.dec.done), logits[i])

    @staticmethod
    def _lead(run: _Running, piece: str) -> str:
        if run.lead and piece:
            run.lead = False
            return piece.lstrip(" ")
        return piece

    def _finish(self, run: _Running, text: str, reason: str) -> None:
        run.job.emit(Event(run.job.index, text=text, finish_reason=reason, prompt_tokens=run.stats.prompt_tokens,
                           completion_tokens=run.stats.new_tokens))

    @staticmethod
    def _fail(job: Job, e: Exception) -> None:
        traceback.print_exception(e, file=sys.stderr)
        job.emit(Event(job.index, error=f"generation failed: {type(e).__name__}: {e}", status=500))
