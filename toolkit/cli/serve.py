"""`lmkit serve RUN|FILE`: an OpenAI-compatible API and a web chat page over one model."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit import console
from toolkit.console import info
from toolkit.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    target: str = typer.Argument(..., help="A run folder, or a llama2.c model.bin (v0, v1 or v2)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; set "
                             "--api-key then)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str = typer.Option(None, "--api-key", envvar="LMKIT_API_KEY", show_envvar=True,
                                help="Require 'Authorization: Bearer KEY' on every route but /health and the page."),
    cors: list[str] = typer.Option(None, "--cors", help="Allow this browser origin (repeatable); off by default."),
    tokenizer: Path = typer.Option(None, "--tokenizer", "-z", help="llama2.c tokenizer.bin for a .bin model "
                                   "(default: the one beside it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests accepted at once (decoding or waiting); "
                                  "more get HTTP 429."),
    max_active: int = typer.Option(16, "--max-active", help="Completions decoded side by side (one token each per "
                                   "round); the rest wait their turn."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may take before it is stopped."),
    batch: bool = typer.Option(True, "--batch/--no-batch", help="One forward per round for all active completions "
                               "(llama on CPU, fp32); --no-batch interleaves one forward per completion."),
    jobs: Path = typer.Option(None, "--jobs", help="A T5 audio run: the folder for rollout jobs (default: RUN/jobs, "
                              "or a temporary folder where RUN is not writable)."),
    codec: str = typer.Option("", "--codec", help="A T5 audio run: the EnCodec for uploaded audio (default "
                              "facebook/encodec_24khz; a job may name another)."),
    data: list[Path] = typer.Option(None, "--data", help="A T5 audio run: a folder whose files (audio, code folders) "
                                    "JSON requests may name (repeatable); without it, only uploads."),
):
    """Serve a model over HTTP: the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions with SSE
    streaming, /v1/generate), /health, and a chat page at /. A T5 audio run (trained on codes) serves audio
    rollout jobs instead: /v1/audio/rollouts (docs/serve.md)."""
    from toolkit import chat as chat_lib
    from toolkit.serve import ServeSettings, create_app
    from toolkit.serve.server import bind, run

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected 1-65535")
    if max_queue < 1 or max_active < 1 or timeout <= 0:
        raise UserError("--max-queue, --max-active and --timeout must be positive")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key / LMKIT_API_KEY is empty")
    sock = bind(host, port)  # before loading: a port in use fails fast
    try:
        settings = ServeSettings(api_key=api_key, cors=tuple(cors or ()), max_queue=max_queue,
                                 max_active=max_active, timeout=timeout, batch=batch)
        audio = _audio_run(Path(target), device)
        if audio is not None:
            from toolkit.serve import AudioSettings, create_audio_app

            audio_run, dev = audio
            folder = jobs or _jobs_dir(Path(target))
            app = create_audio_app(audio_run, settings, AudioSettings(folder, codec, tuple(data or ()), dev))
            name, what = Path(target).resolve().name, f"audio rollout jobs /v1/audio/rollouts, kept in {folder}"
        else:
            if jobs or codec or data:
                raise UserError("--jobs, --codec and --data are for a T5 audio run (rollout jobs)")
            t = chat_lib.load_target(target, tokenizer, device, numpy=True)  # on a CPU: a llama without torch
            app = create_app(t, settings)
            name, what = Path(t.name).name, "chat page /, OpenAI API /v1"
    except BaseException:
        sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    info(f"serving {name} on http://{shown}:{port}  ({what}{', API key required' if api_key else ''})", style=None)
    if host not in LOOPBACK and not api_key:
        info("warning: listening beyond this machine without --api-key", style="yellow")
    run(app, sock, quiet=console.QUIET)


def _audio_run(path: Path, device: str):
    """(the loaded run, its device) when `path` is a run folder of a T5 over audio codes, else None (read from the
    recipe and the tokenizer before any weights)."""
    from toolkit import recipe as recipe_lib
    from toolkit import run as run_lib

    if not (path.is_dir() and run_lib.is_run(path)):
        return None
    try:
        recipe = recipe_lib.load(path / run_lib.RECIPE)
    except Exception:  # noqa: BLE001 - load_target reports a bad run folder
        return None
    if recipe.tokenizer.kind != "audio" or recipe.model.family != "t5":
        return None
    from toolkit.device import resolve_device
    from toolkit.serve import is_audio_run

    device = str(resolve_device(device))
    run = run_lib.load_run(path, device)
    return (run, device) if is_audio_run(run) else None


def _jobs_dir(run: Path) -> Path:
    import os
    import tempfile

    folder = run / "jobs"
    if os.access(run, os.W_OK):
        return folder
    return Path(tempfile.mkdtemp(prefix="lmkit-jobs-"))
