"""The FastAPI app: OpenAI's wire format over one model, through one Scheduler (see scheduler.py).

A request takes one of `max_queue` slots from the moment it is accepted until its response has been sent
(for a stream: until the last event, or the client going away); with none free it gets a 429. Its n choices
are n jobs on the scheduler. Every error a client can cause is OpenAI-shaped JSON (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit import chat as chat_lib
from toolkit.errors import UserError
from toolkit.serve.audio import AudioSettings, JobStore, parse_form, parse_settings
from toolkit.serve.errors import ApiError, error_body
from toolkit.serve.prompts import Prompt, Prompter
from toolkit.serve.scheduler import Event, Job, Scheduler
from toolkit.serve.schemas import ChatRequest, CompletionRequest, GenerateRequest, Limits, Sampled

KEEPALIVE_S = 15.0  # an SSE comment while a stream waits for its first token (queued behind others)


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    max_queue: int = 64  # requests accepted at once (decoding or waiting); more get a 429
    max_active: int = 16  # jobs (choices) decoded side by side
    timeout: float = 300.0  # seconds a request may take
    batch: bool = True  # one forward per round for all active requests where the model allows (llama on CPU)
    limits: Limits = field(default_factory=Limits)


class Slots:
    """The request slots; used from the event loop's thread only."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class Inbox:
    """A request's events, from the worker thread to the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    async def get(self, timeout: float) -> Event:
        """The next event; TimeoutError after `timeout` s. An event already there is taken without a timer, and
        the timer is asyncio.timeout's (on Python 3.11 wait_for made a Task per call: per token, per stream)."""
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if sys.version_info < (3, 11):
            try:
                return await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on 3.10
                raise TimeoutError from None
        async with asyncio.timeout(timeout):
            return await self.queue.get()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is going down
            pass


class EventStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends (done, client gone, cancelled), even when its
    body iterator never started."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (declared or as it arrives) gets a 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = JSONResponse(error_body(413, f"the request body is over {self.max_bytes} bytes",
                                               code="body_too_large"), 413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


class Service:
    """What the routes share: the model, its prompter and scheduler, the slots, counters."""

    def __init__(self, target: chat_lib.Target, settings: ServeSettings):
        self.target, self.settings = target, settings
        self.model_id = Path(target.name).name or target.name
        self.max_len = target.model.config.max_seq_len
        self.prompter = Prompter(target)
        self.scheduler = Scheduler(target.model, target.tokenizer, settings.max_active, settings.batch)
        self.slots = Slots(settings.max_queue)
        self.started = time.time()
        self.requests_served = 0

    # --- checks -----------------------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {self.model_id!r}", "model",
                           "model_not_found")

    def max_tokens(self, given: int | None) -> int:
        limit = self.settings.limits.max_tokens
        if given is not None and given > limit:
            raise ApiError(400, f"max_tokens is at most {limit}", "max_tokens")
        return given if given is not None else self.max_len

    def check_text(self, text: str, param: str) -> None:
        limit = self.settings.limits.max_message_chars
        if len(text) > limit:
            raise ApiError(400, f"{param} is {len(text)} characters; at most {limit}", param, "string_above_max_length")

    def jobs(self, prompt: Prompt, req: Sampled, max_tokens: int, emit) -> list[Job]:
        lim = self.settings.limits
        if req.n > lim.max_n:
            raise ApiError(400, f"n is at most {lim.max_n}", "n")
        stops = req.stops()
        if len(stops) > lim.max_stops or any(len(s) > 256 for s in stops):
            raise ApiError(400, f"stop: at most {lim.max_stops} strings of at most 256 characters", "stop")
        deadline = time.monotonic() + self.settings.timeout
        out = []
        for i in range(req.n):
            seed = req.seed + i if req.seed is not None else None  # n choices from one seed differ
            try:
                sampling = chat_lib.sampling_for(self.target, seed=seed, temperature=req.temperature,
                                                 top_k=req.top_k, top_p=req.top_p)
            except UserError as e:
                raise ApiError(400, str(e)) from None
            out.append(Job(prompt.ids, max_tokens, sampling, emit, stops + prompt.stop_texts, prompt.strip_lead, i,
                           deadline))
        return out

    # --- running a request --------------------------------------------------------------------------------------

    async def respond(self, request: Request, req: Sampled, prompt: Prompt, max_tokens: int, kind: str):
        inbox = Inbox()
        jobs = self.jobs(prompt, req, max_tokens, inbox.put)
        if not self.slots.take():
            raise ApiError(429, f"the server is busy ({self.settings.max_queue} requests in progress); retry later",
                           code="queue_full")
        self.scheduler.submit(jobs)
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": self.model_id}
        closed = False

        def close():
            nonlocal closed
            if not closed:
                closed = True
                for job in jobs:
                    job.cancel()
                self.slots.give()
                self.requests_served += 1

        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self.stream(inbox, len(jobs), len(prompt.ids), meta, kind, usage), close)
        try:
            texts, reasons, completion = await self.collect(request, inbox, len(jobs))
        finally:
            close()
        if texts is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        if kind == "generate":
            return {"text": texts[0], "finish_reason": reasons[0], "model": self.model_id,
                    "prompt_tokens": len(prompt.ids), "completion_tokens": completion}
        return {**meta, "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [choice(kind, i, texts[i], reasons[i]) for i in range(len(jobs))],
                "usage": usage_of(len(prompt.ids), completion)}

    async def collect(self, request: Request, inbox: Inbox, n: int):
        texts, reasons, completion, done = [""] * n, [None] * n, 0, 0
        while done < n:
            try:
                event = await inbox.get(1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return None, None, 0
                continue
            if event.error:
                raise ApiError(event.status, event.error)
            texts[event.index] += event.text
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
                completion += event.completion_tokens
                done += 1
        return texts, reasons, completion

    async def stream(self, inbox: Inbox, n: int, prompt_tokens: int, meta: dict, kind: str, include_usage: bool):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(i, text=None, reason=None, role=False):
            if kind == "chat":
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                c = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return sse({**meta, "object": obj, "choices": [c], **extra})

        if kind == "chat":
            for i in range(n):
                yield chunk(i, role=True)
        completion, done = 0, 0
        while done < n:
            try:
                event = await inbox.get(KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event.error:
                yield sse(error_body(event.status, event.error))
                break
            if event.text:
                yield chunk(event.index, event.text)
            if event.finish_reason:
                yield chunk(event.index, reason=event.finish_reason)
                completion += event.completion_tokens
                done += 1
        if include_usage and done == n:
            yield sse({**meta, "object": obj, "choices": [], "usage": usage_of(prompt_tokens, completion)})
        yield "data: [DONE]\n\n"

    def health(self) -> dict:
        active, waiting = self.scheduler.counts
        recipe = self.target.recipe
        return {"status": "ok", "model": self.model_id, "family": recipe.model.family if recipe else None,
                "params": self.target.model.num_params(), "context_length": self.max_len,
                "chat_template": self.target.template or "completion", "uptime_s": round(time.time() - self.started, 3),
                "requests_served": self.requests_served, "requests_in_progress": self.slots.used,
                "active_jobs": active, "waiting_jobs": waiting, "tokens_generated": self.scheduler.tokens_generated,
                "rss_bytes": rss_bytes()}

    def model_card(self) -> dict:
        recipe = self.target.recipe
        return {"id": self.model_id, "object": "model", "created": int(self.started), "owned_by": "lmkit",
                "family": recipe.model.family if recipe else None, "context_length": self.max_len,
                "chat_template": self.target.template or "completion", "params": self.target.model.num_params()}


def choice(kind: str, i: int, text: str, reason: str) -> dict:
    if kind == "chat":
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}
    return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}


def usage_of(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------------------


def create_app(target: chat_lib.Target, settings: ServeSettings = ServeSettings()) -> FastAPI:
    service = Service(target, settings)
    app, v1 = base_app(settings, settings.limits.max_body_bytes, service.scheduler.close)
    app.state.service = service

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("toolkit.serve").joinpath("static/chat.html").read_text())

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        service.check_model(name)
        return service.model_card()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt (a string); several prompts in one request are not supported",
                           "prompt")
        service.check_text(prompts[0], "prompt")
        prompt = service.prompter.completion_ids(prompts[0])
        return await service.respond(request, body, prompt, service.max_tokens(body.max_tokens), "text")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check_model(body.model)
        if len(body.messages) > settings.limits.max_messages:
            raise ApiError(400, f"at most {settings.limits.max_messages} messages", "messages")
        messages = []
        for i, m in enumerate(body.messages):
            text = m.text()
            service.check_text(text, f"messages[{i}].content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        given = body.max_completion_tokens or body.max_tokens
        max_tokens = service.max_tokens(given)
        prompt = service.prompter.chat_ids(messages, given)
        return await service.respond(request, body, prompt, max_tokens, "chat")

    @v1.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        service.check_model(body.model)
        service.check_text(body.prompt, "prompt")
        prompt = service.prompter.completion_ids(body.prompt)
        req = Sampled(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                      seed=body.seed, stop=body.stop)
        t0 = time.perf_counter()
        out = await service.respond(request, req, prompt, service.max_tokens(body.max_tokens), "generate")
        if isinstance(out, dict):
            seconds = time.perf_counter() - t0
            out.update(seconds=round(seconds, 4),
                       tokens_per_s=round(out["completion_tokens"] / seconds, 2) if seconds > 0 else 0.0)
        return out

    @v1.api_route("/audio/rollouts", methods=["GET", "POST"])
    async def no_audio():
        raise ApiError(404, f"{service.model_id} is a text model: audio rollout jobs need a served T5 audio run",
                       code="not_an_audio_model")

    app.include_router(v1)
    return app


def base_app(settings: ServeSettings, max_body: int, on_shutdown) -> tuple[FastAPI, APIRouter]:
    """The app with what every served model has: error handlers, CORS, the body limit, and the /v1 router that
    checks the API key (include it once its routes are added)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        on_shutdown()

    app = FastAPI(title="lmkit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=max_body)

    def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    return app, APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


def create_audio_app(run, settings: ServeSettings, audio: AudioSettings) -> FastAPI:
    """A served T5 audio run: /health, /v1/models and the rollout jobs (serve/audio.py)."""
    from fastapi.responses import FileResponse

    from toolkit.audio.rollout import check_model

    check_model(run)
    store = JobStore(run, audio)
    app, v1 = base_app(settings, audio.max_upload_bytes, store.close)
    app.state.jobs = store
    model_id = Path(run.path).name
    started = time.time()

    def card() -> dict:
        return {"id": model_id, "object": "model", "created": int(started), "owned_by": "lmkit", "family": "t5",
                "kind": "audio", "context_length": run.model.config.max_seq_len, "params": run.model.num_params(),
                "endpoints": ["/v1/audio/rollouts"]}

    @app.get("/health")
    async def health():
        jobs = store.list()
        counts = {state: sum(j["status"] == state for j in jobs) for state in ("queued", "running", "done", "failed")}
        return {"status": "ok", "model": model_id, "family": "t5", "kind": "audio", "params": run.model.num_params(),
                "uptime_s": round(time.time() - started, 3), "jobs": counts, "rss_bytes": rss_bytes()}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @v1.post("/audio/rollouts")
    async def submit(request: Request):
        kind = request.headers.get("content-type", "")
        body = await request.body()
        if kind.startswith("multipart/form-data"):
            form, files = parse_form(body, kind)
            if "file" not in files:
                raise ApiError(400, "the multipart body has no audio file (field 'file')", "file")
            codec = form.pop("codec", "")
            s = parse_settings(form)
            job = store.submit(s, upload=files["file"], codec=codec)
        else:
            try:
                given = json.loads(body)
            except ValueError:
                raise ApiError(400, "expected JSON (naming a file on the server) or a multipart/form-data upload"
                               ) from None
            if not isinstance(given, dict):
                raise ApiError(400, "expected a JSON object")
            audio_path, codes = given.pop("audio", None), given.pop("from_codes", None)
            codec = given.pop("codec", "") or ""
            if (audio_path is None) == (codes is None) or not isinstance(audio_path or codes, str):
                raise ApiError(400, "name exactly one of 'audio' (an audio file on the server) or 'from_codes' (a "
                               "folder of code files with scores.parquet), or upload the audio as multipart")
            s = parse_settings(given)
            if audio_path is not None:
                job = store.submit(s, audio=store.server_path(audio_path, "audio"), codec=codec)
            else:
                job = store.submit(s, from_codes=store.server_path(codes, "from_codes"), codec=codec)
        return JSONResponse(store.public(job), 202)

    @v1.get("/audio/rollouts")
    async def jobs():
        return {"object": "list", "data": [store.public(j) for j in store.list()]}

    @v1.get("/audio/rollouts/{job_id}")
    async def job(job_id: str):
        return store.public(store.get(job_id))

    @v1.get("/audio/rollouts/{job_id}/files/{name:path}")
    async def job_file(job_id: str, name: str):
        path = store.file(job_id, name)
        media = {".wav": "audio/wav", ".npz": "application/octet-stream", ".json": "application/json"}
        return FileResponse(path, media_type=media.get(path.suffix, "application/octet-stream"), filename=path.name)

    app.include_router(v1)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request body")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return JSONResponse(error_body(400, message, param, "invalid_value"), 400)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, e):
        return JSONResponse(error_body(413, "the request body is too large", code="body_too_large"), 413)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), 500)
