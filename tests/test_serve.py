"""`lmkit serve`: real servers in subprocesses driven by the official `openai` client, plus in-process checks of
the scheduler (interleaving, cancellation, timeouts, the queue) and of every family through the one loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, lmkit

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from toolkit import generate as G  # noqa: E402
from toolkit.serve.scheduler import Event, Job, Scheduler  # noqa: E402

KEY = "test-key"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, target: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "toolkit", "-q", "serve", str(target), "--port", str(self.port),
                                      *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def wait(self, seconds: float = 60.0) -> Server:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer /health in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from toolkit import recipe as recipe_lib
    from toolkit.train.loop import train

    root = tmp_path_factory.mktemp("serve")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE.replace("max_seq_len = 32", "max_seq_len = 128"))
    train(recipe_lib.load(recipe, ["train.max_iters=2"]), root / "base")
    # the same weights as a fine-tuned run: only the recipe's chat template matters to the server
    shutil.copytree(root / "base", root / "chat")
    text = (root / "chat" / "recipe.toml").read_text()
    assert 'chat_template = ""' in text
    (root / "chat" / "recipe.toml").write_text(text.replace('chat_template = ""', 'chat_template = "llama2"'))
    return root


@pytest.fixture(scope="module")
def servers(runs):
    started = {"base": Server(runs / "base", "--api-key", KEY), "chat": Server(runs / "chat")}
    try:
        yield {name: s.wait() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def base(servers):
    return servers["base"]


@pytest.fixture(scope="module")
def client(base):
    return base.client()


# --- the OpenAI API ---------------------------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["base"]
    m = models[0]
    assert m.object == "model" and m.owned_by == "lmkit" and isinstance(m.created, int)
    assert m.model_extra["family"] == "llama" and m.model_extra["context_length"] == 128
    assert m.model_extra["chat_template"] == "completion"


def test_completion_and_its_stream_agree(client):
    kw = {"model": "base", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.id.startswith("cmpl-") and full.model == "base"
    c = full.choices[0]
    assert c.index == 0 and c.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == 1 + len("Once upon a time".encode())  # BOS + bytes
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_stream_has_role_content_finish_and_usage(client):
    kw = {"model": "base", "messages": [{"role": "user", "content": "The dog"}], "max_tokens": 20, "temperature": 0}
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stop_strings_end_the_text_before_them(client):
    kw = {"model": "base", "prompt": "A red", "max_tokens": 40, "temperature": 1.0, "seed": 11}
    text = client.completions.create(**kw).choices[0].text
    stop = next(text[i : i + 2] for i in range(6, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    expected = text[: text.find(stop)]
    for stops in (stop, [stop, "\x00never"]):
        got = client.completions.create(**kw, stop=stops).choices[0]
        assert got.text == expected and stop not in got.text and got.finish_reason == "stop"
        pieces = [ch.choices[0].text for ch in client.completions.create(**kw, stop=stops, stream=True)]
        assert "".join(pieces) == expected and not any(stop in p for p in pieces)


def test_stop_text_holds_back_a_possible_start():
    s = G.StopText(["END", "xy"])
    assert s.feed("abcE") == "abc" and s.feed("N") == "" and s.feed("Dzz") == "" and s.stopped
    s = G.StopText(["END"])
    assert s.feed("aE") == "a" and s.feed("x") == "Ex" and s.feed("EN") == "" and s.flush() == "EN"


def test_n_and_seeds(client):
    kw = {"model": "base", "prompt": "Sun", "max_tokens": 16, "temperature": 1.0}
    two = client.completions.create(**kw, n=2, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.completions.create(**kw, n=2, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    assert client.completions.create(**kw, seed=5).choices[0].text == two.choices[0].text
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in (6, 7, 8)}
    assert len(others | {two.choices[0].text}) > 1


def test_bad_requests_are_openai_shaped_400s(client, base):
    bad = [{"prompt": "x", "temperature": -1}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "n": 99},
           {"prompt": "x", "top_p": 2}, {"prompt": "x" * 200}, {"prompt": ["a", "b"]}]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="base", **extra)
        err = e.value.response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="tokens too many"):
        client.completions.create(model="base", prompt="x" * 200)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"not json", b'{"prompt": 3}', b"[]"):
        r = httpx.post(base.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(base.url + "/v1/completions", content=b"x" * (2 << 20), headers=headers)
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(base.url + "/v1/nothing", headers=headers).status_code == 404


def test_api_key(base):
    for key in ("wrong", None):
        with pytest.raises(openai.AuthenticationError):
            base.client(key).models.list()
    r = httpx.get(base.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base.url + "/health").status_code == 200
    assert "<title>lmkit chat</title>" in httpx.get(base.url + "/").text


def test_eight_parallel_streams_each_get_their_own_answer(client):
    prompts = [f"{w} story" for w in ("cat", "dog", "sun", "moon", "tree", "bird", "sea", "rain")]

    def ask(i, stream):
        kw = {"model": "base", "prompt": prompts[i], "max_tokens": 40, "temperature": 1.0, "seed": 100 + i}
        if not stream:
            return client.completions.create(**kw).choices[0].text
        return "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True))

    alone = [ask(i, False) for i in range(8)]
    assert len(set(alone)) > 4
    got = [None] * 8

    def worker(i):
        got[i] = ask(i, True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone
    greedy = [client.completions.create(model="base", prompt=p, max_tokens=20, temperature=0).choices[0].text
              for p in prompts[:3]]
    with_threads = [None] * 3
    threads = [threading.Thread(target=lambda i=i: with_threads.__setitem__(i, client.completions.create(
        model="base", prompt=prompts[i], max_tokens=20, temperature=0).choices[0].text)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert with_threads == greedy


def test_health_and_generate(base):
    h = httpx.get(base.url + "/health").json()
    assert h["model"] == "base" and h["family"] == "llama" and h["params"] > 0 and h["uptime_s"] > 0
    assert h["rss_bytes"] > 0 and h["context_length"] == 128
    before = h["requests_served"]
    r = httpx.post(base.url + "/v1/generate", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0},
                   headers={"Authorization": f"Bearer {KEY}"})
    out = r.json()
    assert r.status_code == 200 and isinstance(out["text"], str) and out["completion_tokens"] <= 8
    assert out["finish_reason"] in ("stop", "length") and out["prompt_tokens"] == 6
    assert httpx.get(base.url + "/health").json()["requests_served"] == before + 1


def test_a_cpu_server_runs_the_llama_without_torch_and_answers_as_the_torch_model(base, client, runs):
    """Where no GPU can be, `lmkit serve` loads a standard llama straight into numpy (no PyTorch in the process:
    a third of the memory, a third of the start-up) and answers what the torch-loaded model generates."""
    from toolkit import chat as C

    if C.accelerator_possible() or not Path(f"/proc/{base.proc.pid}/maps").is_file():
        pytest.skip("a GPU could be here (the server loads torch), or no /proc to look into")
    assert "libtorch" not in Path(f"/proc/{base.proc.pid}/maps").read_text()
    target = C.load_target(runs / "base")  # the torch Model, in this process
    ids = target.tokenizer.encode("Once upon a time")
    want = G.generate(target.model, [target.tokenizer.bos_id] + ids, 16, G.Sampling(temperature=0),
                      stop_ids=G.stop_ids_for(target.tokenizer))
    got = client.completions.create(model="base", prompt="Once upon a time", max_tokens=16, temperature=0)
    assert got.choices[0].text == target.tokenizer.decode(want) and got.usage.completion_tokens == len(want)


def test_chat_template_run(servers):
    c = servers["chat"].client()
    assert c.models.list().data[0].model_extra["chat_template"] == "llama2"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = c.chat.completions.create(model="chat", messages=msgs, max_tokens=10, temperature=0)
    # llama2 template: BOS "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]" in bytes
    assert r.usage.prompt_tokens == 1 + len("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    long_history = []
    for i in range(20):
        long_history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * 3}]
    r = c.chat.completions.create(model="chat", messages=long_history + [{"role": "user", "content": "Hi"}],
                                  max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens <= 128 - 10  # old turns dropped to fit
    with pytest.raises(openai.BadRequestError, match="too many"):
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "y" * 150}], max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="alternate|user"):
        c.chat.completions.create(model="chat", messages=[{"role": "assistant", "content": "y"}])


# --- the CLI's errors ---------------------------------------------------------------------------------------------


def test_cli_errors_are_one_line(capsys, runs, tmp_path):
    code, _, err = lmkit(capsys, "serve", str(tmp_path / "missing"), "--port", str(free_port()))
    assert code == 1 and "not found" in err and "Traceback" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, _, err = lmkit(capsys, "serve", str(runs / "base"), "--port", str(busy.getsockname()[1]))
    assert code == 1 and "cannot listen" in err


# --- in process: the scheduler and the queue ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(runs):
    from toolkit.chat import load_target

    return load_target(runs / "base")


def collect_jobs(scheduler, specs, on_event=None):
    """Run jobs to the end; returns {index: [events]} and the order of (index) as events came."""
    done = threading.Event()
    events: dict[int, list[Event]] = {i: [] for i in range(len(specs))}
    order, finished = [], set()

    def emit(e: Event):
        events[e.index].append(e)
        order.append(e.index)
        if on_event:
            on_event(e)
        if e.finish_reason or e.error:
            finished.add(e.index)
            if len(finished) == len(specs):
                done.set()

    jobs = [Job(ids, n, G.Sampling(temperature=0), emit, index=i) for i, (ids, n) in enumerate(specs)]
    scheduler.submit(jobs)
    return jobs, events, order, done


def test_scheduler_interleaves_and_matches_the_one_loop(target):
    tok = target.tokenizer
    prompts = [[tok.bos_id] + tok.encode(p) for p in ("ab", "cd", "ef")]
    s = Scheduler(target.model, tok)
    try:
        _, events, order, done = collect_jobs(s, [(p, 30) for p in prompts])
        assert done.wait(30)
        for i, p in enumerate(prompts):
            alone = G.generate(G.decoder_for(target.model), p, 30, G.Sampling(temperature=0), G.stop_ids_for(tok))
            text = "".join(e.text for e in events[i])
            assert text == tok.decode(alone) and events[i][-1].completion_tokens == len(alone)
        firsts = [order.index(i) for i in range(3)]
        lasts = [len(order) - 1 - order[::-1].index(i) for i in range(3)]
        assert max(firsts) < min(lasts)  # all three were in progress together
        assert s.counts == (0, 0)
    finally:
        s.close()


def test_batched_rounds_give_each_request_what_it_gets_alone(target):
    """Eight greedy jobs with distinct prompts, in one batched forward per round (joining and leaving as they start
    and end, at different positions), each give exactly the tokens they give alone, and the one loop's."""
    tok = target.tokenizer
    words = ("cat", "dog", "sun", "moon", "tree", "bird", "sea", "rain")
    prompts = [[tok.bos_id] + tok.encode(f"{w} " * (1 + i % 3)) for i, w in enumerate(words)]
    lengths = [12 + 3 * i for i in range(8)]  # they leave the batch at different rounds
    alone = [G.generate(G.decoder_for(target.model), p, n, G.Sampling(temperature=0), G.stop_ids_for(tok))
             for p, n in zip(prompts, lengths)]
    assert len({tuple(a) for a in alone}) > 4  # the trained model answers differently
    s = Scheduler(target.model, tok)
    assert s.batch is not None
    steps, step = [], s.batch.step
    s.batch.step = lambda decs, *a: (steps.append(len(decs)), step(decs, *a))[1]
    try:
        _, events, _, done = collect_jobs(s, list(zip(prompts, lengths)))
        assert done.wait(60)
        batched = list(steps)
        one = [None] * 8
        for i in range(8):  # the same scheduler, one job at a time
            _, ev, _, d = collect_jobs(s, [(prompts[i], lengths[i])])
            assert d.wait(30)
            one[i] = "".join(e.text for e in ev[0])
    finally:
        s.close()
    for i in range(8):
        assert "".join(e.text for e in events[i]) == one[i] == tok.decode(alone[i]), i
        assert events[i][-1].completion_tokens == len(alone[i])
    assert max(batched) == 8 and min(batched) < 8  # all eight in one forward, fewer as they left


def test_a_prompt_is_prefilled_in_one_pass_not_a_token_a_round(target):
    """A job's prompt runs on its own decoder in one pass: the batched rounds start at its first generated token
    (fed a token a round, a 30-token prompt waited 30 rounds for its first token)."""
    tok = target.tokenizer
    prompt = [tok.bos_id] + tok.encode("the cat sat on the mat and ran")
    n = 8
    assert 20 < len(prompt) < target.model.config.max_seq_len - n
    s = Scheduler(target.model, tok)
    fed, step = [], s.batch.step
    s.batch.step = lambda decs, toks, pos: (fed.extend(pos), step(decs, toks, pos))[1]
    try:
        _, events, _, done = collect_jobs(s, [(prompt, n)])
        assert done.wait(30)
    finally:
        s.close()
    alone = G.generate(G.decoder_for(target.model), prompt, n, G.Sampling(temperature=0), G.stop_ids_for(tok))
    assert "".join(e.text for e in events[0]) == tok.decode(alone)
    assert len(alone) > 1 and sorted(fed) == list(range(len(prompt), len(prompt) + len(alone) - 1))


def test_cancel_stops_the_work_and_timeout_reports(target):
    """Cancelled from inside its first event (as a client going away would): no more work, nothing more sent."""
    tok = target.tokenizer
    s = Scheduler(target.model, tok)
    try:
        got, gone = [], threading.Event()
        job = Job([tok.bos_id] + tok.encode("Once"), 100, G.Sampling(temperature=0), lambda e: (got.append(e), job.cancel()))
        s.submit([job])
        deadline = time.monotonic() + 10
        while (got == [] or s.counts != (0, 0)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.counts == (0, 0) and len(got) == 1 and got[0].finish_reason is None
        job = Job([tok.bos_id], 100, G.Sampling(temperature=0), lambda e: (got.append(e), gone.set()), deadline=0)
        s.submit([job])
        assert gone.wait(10) and got[-1].status == 408 and "timed out" in got[-1].error
    finally:
        s.close()


def test_full_queue_gets_a_429(target):
    from toolkit.serve import ServeSettings, create_app

    app = create_app(target, ServeSettings(max_queue=1))
    service = app.state.service
    service.scheduler.close()  # a stopped worker: the first request waits, holding the only slot
    service.scheduler.submit = lambda jobs: None

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}))
            while service.slots.used == 0:
                await asyncio.sleep(0.01)
            second = await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 4})
            first.cancel()
            return second

    r = asyncio.run(go())
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"


FAMILIES = {"gpt2_baseline": ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=64"],
            "resonance": ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=64"],
            "pgpt_lformer_cpu": ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.head_dim=16",
                                 "model.max_seq_len=64"],
            "attractor_a1": ["model.dim=16", "model.steps=2"]}


def test_every_chat_family_serves_through_the_one_loop(target, tmp_path):
    from helpers_export import make_run, sentencepiece_tokenizer

    from toolkit import models
    from toolkit import recipe as recipe_lib
    from toolkit.chat import Target, load_target
    from toolkit.export import export_run
    from toolkit.serve import create_app
    from toolkit.tokenizers.bytes import BytesTokenizer

    tok = BytesTokenizer(0)
    targets = [target]
    for name, sets in FAMILIES.items():
        r = recipe_lib.load(name, sets + ["model.vocab_size=0"])
        targets.append(Target(models.build(r.model, tok.vocab_size), tok, r, name))
    sp = sentencepiece_tokenizer(tmp_path / "sp")
    export_run(make_run(tmp_path / "sp_run", sp), tmp_path / "model.bin")
    targets.append(load_target(tmp_path / "model.bin"))
    for t in targets:
        app = create_app(t)
        out = asgi_post(app, "/v1/completions", {"prompt": "Lily had", "max_tokens": 6, "temperature": 0}).json()
        ids = [t.tokenizer.bos_id] + t.tokenizer.encode("Lily had")
        alone = G.generate(G.decoder_for(t.model), ids, 6, G.Sampling(temperature=0), G.stop_ids_for(t.tokenizer))
        assert out["choices"][0]["text"] == t.tokenizer.decode(alone), t.name
        assert out["usage"]["completion_tokens"] == len(alone)
        app.state.service.scheduler.close()


def asgi_post(app, path: str, body: dict):
    """POST to an ASGI app in process (httpx's ASGITransport is async-only)."""

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, json=body)

    return asyncio.run(go())
