"""Remote audio rollouts: a T5 audio run served by a real uvicorn in a thread of this process (so the tiny test
codec applies), driven by `lmkit audio rollout --server` / `lmkit audio jobs` and by plain HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from audio_helpers import SR, music
from conftest import lmkit
from test_audio_t5 import codec_dir, song, t5_run  # noqa: F401 - the tiny T5 audio run, codec and song fixtures

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "k"
OPTS = {"samples": 2, "prompt_length": 16, "iterations": 2, "tokens_per_step": 6, "seed": 3}


def cli_opts(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


class ThreadServer:
    def __init__(self, app):
        from toolkit.serve.server import bind

        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def served(t5_run, codec_dir, song, tmp_path_factory):  # noqa: F811
    from toolkit.run import load_run
    from toolkit.serve import AudioSettings, ServeSettings, create_audio_app

    jobs = tmp_path_factory.mktemp("jobs")
    app = create_audio_app(load_run(t5_run, "cpu"), ServeSettings(api_key=KEY),
                           AudioSettings(jobs, str(codec_dir), (song.parent,)))
    server = ThreadServer(app)
    try:
        yield server, jobs
    finally:
        server.stop()


def get(url: str, key: str | None = KEY):
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def wait_done(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = get(f"{url}/v1/audio/rollouts/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError("the job did not finish")


def test_cli_client_submits_waits_and_fetches_what_a_local_rollout_writes(capsys, tmp_path, served, t5_run,  # noqa: F811
                                                                           codec_dir, song):  # noqa: F811
    from toolkit.audio.rollout import RolloutSettings, rollout

    server, jobs_dir = served
    out = tmp_path / "remote"
    code, _, err = lmkit(capsys, "-q", "audio", "rollout", str(song), "--server", server.url, "--api-key", KEY,
                         "-o", str(out), *cli_opts(OPTS))
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"song_{i}_{k}.wav" for i in range(2) for k in ("prompt", "rollout")]
                           + ["song_rollout.npz", "rollout.json"])
    local = tmp_path / "local"
    rollout(t5_run, local, RolloutSettings(**OPTS), audio_path=song, codec_name=str(codec_dir), device="cpu")
    with np.load(out / "song_rollout.npz", allow_pickle=False) as a, np.load(local / "song_rollout.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for name in names:
        if name.endswith(".wav"):
            np.testing.assert_array_equal(sf.read(out / name)[0], sf.read(local / name)[0])
    report = json.loads((out / "rollout.json").read_text())
    assert report["tape_frames"] == json.loads((local / "rollout.json").read_text())["tape_frames"]
    job_id = report["job"]
    assert json.loads((jobs_dir / job_id / "job.json").read_text())["status"] == "done"  # state kept on disk

    # the listing; fetching an earlier job again; refusing to overwrite
    code, listed, err = lmkit(capsys, "audio", "jobs", "--server", server.url, "--api-key", KEY)
    assert code == 0 and f"{job_id}  done     4/4" in listed  # 2 samples x 2 iterations
    code, _, err = lmkit(capsys, "-q", "audio", "rollout", "--server", server.url, "--api-key", KEY, "--job", job_id,
                         "-o", str(out))
    assert code == 1 and "already exists; pass --force" in err
    code, _, err = lmkit(capsys, "-q", "audio", "rollout", "--server", server.url, "--api-key", KEY, "--job", job_id,
                         "-o", str(tmp_path / "again"))
    assert code == 0 and (tmp_path / "again" / "song_rollout.npz").read_bytes() == (out / "song_rollout.npz"
                                                                                      ).read_bytes()
    code, _, err = lmkit(capsys, "audio", "jobs", "--server", server.url)
    assert code == 1 and "API key" in err and "Traceback" not in err
    code, _, err = lmkit(capsys, "audio", "rollout", str(song), "--server", server.url, "--model", str(t5_run), "-o",
                         str(tmp_path / "x"))
    assert code == 1 and "exactly one of --model" in err


def test_job_api_json_requests_files_and_failures(tmp_path, served, song):  # noqa: F811
    server, jobs_dir = served
    url = server.url + "/v1/audio/rollouts"
    auth = {"Authorization": f"Bearer {KEY}"}
    # a file on the server, named in JSON (inside --data)
    r = httpx.post(url, json={"audio": song.name, **OPTS, "iterations": 1}, headers=auth)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["progress"]["total"] == 2
    done = wait_done(server.url, job["id"])
    assert done["status"] == "done" and done["progress"] == {"done": 2, "total": 2}
    assert set(done["files"]) >= {"song_rollout.npz", "song_0_rollout.wav", "rollout.json"}
    wav = get(f"{url}/{job['id']}/files/song_0_rollout.wav")
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    # no path traversal, no files it did not list, no other jobs
    for name in ("..%2Fjob.json", "../job.json", "%2E%2E", "sub%2Fx.wav", "job.json"):
        r = get(f"{url}/{job['id']}/files/{name}")
        assert r.status_code in (400, 404) and "RIFF" not in r.text and '"status"' not in r.text, name
    assert get(f"{url}/nope").status_code == 404
    # bad requests: paths outside --data, unknown options, settings the model cannot take, no key
    for body in ({"audio": "/etc/passwd"}, {"audio": "../" * 8 + "etc/passwd"}, {"audio": song.name, "bogus": 1},
                 {"audio": song.name, "prompt_length": 48}, {"audio": song.name, "samples": 0}, {},
                 {"audio": song.name, "from_codes": "x"}, {"audio": song.name, "samples": "two"}):
        r = httpx.post(url, json=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["message"], body
    assert httpx.post(url, json={"audio": song.name}).status_code == 401
    # a job that fails on the worker (the audio is shorter than the prompt) is reported, and the next one runs
    short = tmp_path / "short.wav"
    sf.write(short, music(0.1, seed=1), SR)
    from toolkit.serve.client import multipart

    body, kind = multipart({"prompt_length": "16"}, "file", "short.wav", short.read_bytes())
    req = urllib.request.Request(url, data=body, headers=auth | {"Content-Type": kind}, method="POST")
    with urllib.request.urlopen(req) as r:
        failed = wait_done(server.url, json.loads(r.read())["id"])
    assert failed["status"] == "failed" and "fewer than --prompt-length 16" in failed["error"]
    listed = get(url).json()["data"]
    assert [j["id"] for j in listed][:2] == [failed["id"], job["id"]]  # newest first
    health = httpx.get(server.url + "/health").json()
    assert health["kind"] == "audio" and health["jobs"]["failed"] >= 1 and health["jobs"]["done"] >= 1
    # text routes are not there; a restart finds the jobs on disk
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=auth).status_code == 404
    from toolkit.serve.audio import AudioSettings, JobStore

    class FakeRun:
        pass

    again = JobStore(FakeRun(), AudioSettings(jobs_dir))
    try:
        assert {job["id"], failed["id"]} <= set(again.jobs) and again.get(job["id"])["status"] == "done"
    finally:
        again.close()
