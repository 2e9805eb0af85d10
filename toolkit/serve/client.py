"""The client of a server's audio rollout jobs (serve/audio.py), on the standard library's urllib only: submit
a job, wait for it with a progress bar, fetch its files; list the jobs. Used by `lmkit audio rollout --server`
and `lmkit audio jobs`."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from toolkit.errors import UserError
from toolkit.fsio import atomic_write


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url, self.api_key, self.timeout = url, api_key, timeout

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:300] or e.reason
            raise UserError(f"{self.url}: {message} (HTTP {e.code})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot reach the server at {self.url}: {reason}") from None

    def _json(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        with self._request(method, path, body, content_type) as r:
            return json.loads(r.read())

    # --- the jobs -----------------------------------------------------------------------------------------------

    def submit_upload(self, audio: Path, settings: dict, codec: str = "") -> dict:
        audio = Path(audio)
        if not audio.is_file():
            raise UserError(f"audio file not found: {audio}")
        fields = {k: str(v) for k, v in settings.items()} | ({"codec": codec} if codec else {})
        body, kind = multipart(fields, "file", audio.name, audio.read_bytes())
        return self._json("POST", "/v1/audio/rollouts", body, kind)

    def submit_named(self, settings: dict, audio: str | None = None, from_codes: str | None = None,
                     codec: str = "") -> dict:
        given = dict(settings) | ({"audio": audio} if audio else {}) | ({"from_codes": from_codes} if from_codes else {})
        if codec:
            given["codec"] = codec
        return self._json("POST", "/v1/audio/rollouts", json.dumps(given).encode(), "application/json")

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/audio/rollouts/{urllib.parse.quote(job_id, safe='')}")

    def jobs(self) -> list[dict]:
        return self._json("GET", "/v1/audio/rollouts")["data"]

    def fetch(self, job_id: str, name: str, dest: Path) -> None:
        path = f"/v1/audio/rollouts/{urllib.parse.quote(job_id, safe='')}/files/{urllib.parse.quote(name, safe='')}"
        with self._request("GET", path) as r:
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)

            atomic_write(dest, write)

    def wait(self, job_id: str, poll: float = 0.5, on_progress=None) -> dict:
        """Poll until the job is done or failed; `on_progress(job)` after each poll."""
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in ("done", "failed"):
                return job
            time.sleep(poll)


def multipart(fields: dict[str, str], file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = "lmkit-" + secrets.token_hex(12)
    safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{safe}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def remote_rollout(client: Client, out: Path, settings: dict, audio: Path | None = None,
                   from_codes: str | None = None, codec: str = "", job_id: str | None = None,
                   force: bool = False, poll: float = 0.5) -> dict:
    """Submit (or, with job_id, follow an earlier job), wait with a progress bar, fetch every file into `out`.
    Returns the finished job."""
    from toolkit import console

    out = Path(out)
    if job_id is None:
        if (audio is None) == (from_codes is None):
            raise UserError("give exactly one of AUDIO (uploaded to the server) or --from-codes DIR (a folder on the "
                            "server)")
        job = (client.submit_upload(audio, settings, codec) if audio is not None
               else client.submit_named(settings, from_codes=from_codes, codec=codec))
        console.info(f"job {job['id']} submitted to {client.url}", style="dim")
    else:
        job = client.job(job_id)
    with console.progress() as bar:
        task = bar.add_task(f"{job['id']} {job['status']}", total=job["progress"]["total"])

        def show(j):
            where = f" ({j['queue_position']} ahead)" if j["status"] == "queued" and j.get("queue_position") else ""
            bar.update(task, completed=j["progress"]["done"], total=j["progress"]["total"],
                       description=f"{j['id']} {j['status']}{where}")

        job = client.wait(job["id"], poll, show)
    if job["status"] == "failed":
        raise UserError(f"job {job['id']} failed on the server: {job['error']}")
    existing = [out / n for n in job["files"] if (out / n).exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to replace it (the job {job['id']} stays on the "
                        f"server: fetch it again with --job {job['id']})")
    for name in job["files"]:
        client.fetch(job["id"], name, out / name)
    return job
