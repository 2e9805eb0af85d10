"""Remote T5 audio rollouts: jobs that a client submits, polls and fetches the results of (attn_demo's remote
rollout service), for a served run that is a T5 over audio codes.

A job is a folder under the server's job folder: job.json (its state, rewritten atomically with toolkit.fsio at
each change and every second of progress), input/ (the uploaded audio) and out/ (what `lmkit audio rollout`
writes: the prompt and rollout wavs, the tapes .npz, rollout.json). ONE worker thread runs the jobs in order,
one at a time, on the model loaded at start; a job does not depend on the client that submitted it staying
connected. Jobs found queued or running when the server starts (it stopped under them) are queued again: a
rollout is reproducible from its seed, so the rerun gives the same files.

The rollout is toolkit.audio.rollout's steps (prompts, extend_tapes) with the model and codecs kept loaded;
the files are written as `rollout()` writes them (tests/test_serve_audio.py checks they are the same).
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from toolkit.audio import rollout as R
from toolkit.errors import UserError
from toolkit.fsio import atomic_write_bytes, atomic_write_json
from toolkit.serve.errors import ApiError

STATES = ("queued", "running", "done", "failed")
SETTING_NAMES = tuple(f.name for f in fields(R.RolloutSettings))
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class AudioSettings:
    jobs_dir: Path
    codec: str = ""  # "" = toolkit.audio.DEFAULT_CODEC; a job may name another
    data_roots: tuple[Path, ...] = ()  # folders whose files a JSON request may name (audio, from_codes)
    device: str = "cpu"
    max_upload_bytes: int = 256 << 20


def is_audio_run(run) -> bool:
    return bool(run.model.is_encoder_decoder) and getattr(run.tokenizer, "kind", None) == "audio"


def safe_stem(filename: str) -> str:
    stem = SAFE_NAME.sub("_", Path(filename.replace("\\", "/")).stem).strip("._")
    return stem[:80] or "audio"


def parse_settings(given: dict) -> R.RolloutSettings:
    """RolloutSettings from request fields (JSON values or form strings); unknown names are a 400."""
    unknown = sorted(set(given) - set(SETTING_NAMES))
    if unknown:
        raise ApiError(400, f"unknown rollout option {unknown[0]!r}; the options are {', '.join(SETTING_NAMES)}",
                       unknown[0])
    defaults = R.RolloutSettings()
    values = {}
    for name, value in given.items():
        kind = type(getattr(defaults, name))
        try:
            if isinstance(value, bool) or value is None:
                raise ValueError
            values[name] = kind(value) if kind is float else int(str(value)) if kind is int else value
        except (TypeError, ValueError):
            raise ApiError(400, f"{name}: expected a number, got {value!r}", name) from None
    try:
        return R.RolloutSettings(**values)
    except UserError as e:
        raise ApiError(400, str(e)) from None


class JobStore:
    """The jobs on disk and in memory, and the worker that runs them. Thread-safe."""

    def __init__(self, run, settings: AudioSettings):
        self.run, self.settings = run, settings
        self.root = Path(settings.jobs_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.jobs: dict[str, dict] = {}
        self.queue: list[str] = []
        self.codecs: dict[str, object] = {}
        self.closed = False
        self._load()
        self.thread = threading.Thread(target=self._loop, name="lmkit-serve-audio", daemon=True)
        self.thread.start()

    # --- state --------------------------------------------------------------------------------------------------

    def _load(self) -> None:
        found = []
        for path in self.root.glob("*/job.json"):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if job.get("id") != path.parent.name:
                continue
            if job["status"] in ("queued", "running"):  # the server stopped under it: run it again
                job.update(status="queued", started=None, progress={"done": 0, "total": job["progress"]["total"]})
                self._save(job)
            found.append(job)
        for job in sorted(found, key=lambda j: j["created"]):
            self.jobs[job["id"]] = job
            if job["status"] == "queued":
                self.queue.append(job["id"])

    def _save(self, job: dict) -> None:
        atomic_write_json(self.root / job["id"] / "job.json", job)

    def _update(self, job: dict, **changes) -> None:
        with self.lock:
            job.update(changes)
            snapshot = json.loads(json.dumps(job))
        self._save(snapshot)

    def get(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise ApiError(404, f"no audio rollout job {job_id!r}", "id", "job_not_found")
            return json.loads(json.dumps(job))

    def list(self) -> list[dict]:
        with self.lock:
            return [json.loads(json.dumps(j)) for j in sorted(self.jobs.values(), key=lambda j: j["created"],
                                                               reverse=True)]

    def file(self, job_id: str, name: str) -> Path:
        """The path of one result file; only plain names of files the job listed (no path traversal)."""
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
            raise ApiError(400, f"{name!r} is not a file name (no path separators)", "name", "invalid_file_name")
        job = self.get(job_id)
        if name not in job["files"]:
            raise ApiError(404, f"job {job_id} has no file {name!r}" + ("" if job["status"] == "done" else
                           f" (it is {job['status']})"), "name", "file_not_found")
        path = self.root / job_id / "out" / name
        if not path.is_file():
            raise ApiError(404, f"job {job_id}: {name} is gone from the server's job folder", "name",
                           "file_not_found")
        return path

    # --- submitting ---------------------------------------------------------------------------------------------

    def server_path(self, given: str, param: str) -> Path:
        """A path a JSON request names: it must lie inside one of the server's --data folders."""
        if not self.settings.data_roots:
            raise ApiError(400, f"{param}: this server takes no paths on it (start it with --data DIR to allow files "
                           "under DIR); upload the audio instead", param)
        path = Path(given).expanduser()
        for root in self.settings.data_roots:
            root = Path(root).resolve()
            full = (root / path).resolve()
            if full.is_relative_to(root) and full.exists():
                return full
        raise ApiError(400, f"{param}: {given} is not inside the server's --data folders, or does not exist", param)

    def submit(self, s: R.RolloutSettings, *, upload: tuple[str, bytes] | None = None, audio: Path | None = None,
               from_codes: Path | None = None, codec: str = "") -> dict:
        try:
            R.limits(self.run.model.config, s)  # a prompt the model cannot take fails now, not in the queue
        except UserError as e:
            raise ApiError(400, str(e)) from None
        job_id = f"ar-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        folder = self.root / job_id
        if upload is not None:
            filename, data = upload
            audio = folder / "input" / f"{safe_stem(filename)}{Path(filename).suffix.lower()[:8] or '.wav'}"
            atomic_write_bytes(audio, data)
            source, stem = filename, safe_stem(filename)
        elif audio is not None:
            source, stem = str(audio), safe_stem(audio.name)
        else:
            source, stem = str(from_codes), safe_stem(Path(from_codes).name)
        job = {"id": job_id, "object": "audio.rollout", "status": "queued", "created": time.time(), "started": None,
               "finished": None, "source": source, "mode": "codes" if from_codes else "audio",
               "audio": str(audio) if audio else None, "from_codes": str(from_codes) if from_codes else None,
               "stem": stem, "codec": codec, "settings": asdict(s),
               "progress": {"done": 0, "total": s.samples * s.iterations}, "files": [], "error": None,
               "report": None}
        self._save(job)
        with self.wake:
            self.jobs[job_id] = job
            self.queue.append(job_id)
            self.wake.notify()
        return self.get(job_id)

    def public(self, job: dict) -> dict:
        out = {k: v for k, v in job.items() if k not in ("audio", "from_codes", "stem")}
        with self.lock:
            ahead = self.queue.index(job["id"]) if job["id"] in self.queue else None
        out["queue_position"] = ahead
        return out

    # --- the worker ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
                job = self.jobs[self.queue.pop(0)]
            self._update(job, status="running", started=time.time())
            try:
                report = self._roll(job)
            except Exception as e:  # noqa: BLE001 - a bad job must not stop the worker
                if not isinstance(e, UserError):
                    traceback.print_exception(e, file=sys.stderr)
                message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                self._update(job, status="failed", finished=time.time(), error=message)
                continue
            files = R.output_paths(Path("."), job["stem"], job["settings"]["samples"])
            self._update(job, status="done", finished=time.time(), files=[p.name for p in files],
                         report=report, progress={**job["progress"], "done": job["progress"]["total"]})

    def _codec(self, name: str):
        from toolkit.audio.codec import load_codec

        if name not in self.codecs:
            self.codecs[name] = load_codec(name, self.settings.device)
        return self.codecs[name]

    def _roll(self, job: dict) -> dict:
        """toolkit.audio.rollout's steps on the loaded model; writes job/out as `lmkit audio rollout` does."""
        from toolkit.generate import make_generator

        t0 = time.perf_counter()
        run, tok = self.run, self.run.tokenizer
        s = R.RolloutSettings(**job["settings"])
        rng = np.random.Generator(np.random.PCG64(s.seed))
        audio = job["audio"] if job["mode"] == "audio" else None
        codes = Path(job["from_codes"]) if job["mode"] != "audio" else None
        prompts, where, codec = R.prompts_and_codec(tok, s, rng, self._codec, audio, codes,
                                                    job["codec"] or self.settings.codec, job["source"])
        last_save = [time.monotonic()]

        def on_step():
            with self.lock:
                job["progress"]["done"] += 1
            if time.monotonic() - last_save[0] > 1.0:
                last_save[0] = time.monotonic()
                self._update(job)

        t_gen = time.perf_counter()
        tapes, log = R.extend_tapes(run.model, prompts, s, rng, make_generator(s.seed), tok.pad_id, on_step=on_step)
        gen_seconds = time.perf_counter() - t_gen
        out = self.root / job["id"] / "out"
        frames = R.write_rollout(out, job["stem"], tok, codec, prompts, tapes, log, s)
        report = R.rollout_report(run, job["source"], job["mode"], codec, s, where, log, frames, gen_seconds, t0)
        report["job"] = job["id"]
        atomic_write_json(out / "rollout.json", report)
        return report


# --- multipart/form-data, without python-multipart --------------------------------------------------------------


def parse_form(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """(fields, files {name: (filename, bytes)}) of a multipart/form-data body, with the standard library's
    MIME parser."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise ApiError(400, "expected a multipart/form-data body with the audio as the field 'file'")
    fields_, files = {}, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, data)
        else:
            fields_[name] = data.decode("utf-8", "replace")
    return fields_, files
