"""`lmkit audio encode | score | decode | info | rollout | jobs`: music -> EnCodec codes -> priority scores, and
back; T5 rollouts from audio prompts, here or as jobs on an `lmkit serve` (--server)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from toolkit.audio import DEFAULT_BANDWIDTH, DEFAULT_CODEC
from toolkit.console import info
from toolkit.errors import UserError

app = typer.Typer(help="Music to EnCodec codes (and back), and per-chunk priority scores for training.",
                  no_args_is_help=True)

CODEC_HELP = f"EnCodec to use: a Hugging Face hub name ({DEFAULT_CODEC}) or a local folder saved with save_pretrained."
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."


@app.command("encode")
def encode(
    inputs: list[Path] = typer.Argument(..., help="Audio files (wav, flac, ogg, mp3, ...) or folders (searched "
                                        "deeply)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the code files: one .npz per audio file "
                             "(a folder's subfolders are kept)."),
    bandwidth: float = typer.Option(DEFAULT_BANDWIDTH, help="kbps; for the 24 kHz codec 1.5, 3, 6, 12 or 24 = 2, 4, "
                                    "8, 16 or 32 codebooks of 1024 at 75 Hz."),
    codec: str = typer.Option(DEFAULT_CODEC, "--codec", help=CODEC_HELP),
    chunk_seconds: float = typer.Option(20.0, help="Longest piece encoded at once (bounds memory); cuts go in "
                                        "silences of 1 s or more where there are any."),
    context_seconds: float = typer.Option(1.0, help="Audio before each piece fed to the encoder and dropped, so "
                                          "codes at the cuts match a single pass."),
    batch_size: int = typer.Option(4, help="Pieces encoded together."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace existing code files."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Keep existing code files and encode only "
                                       "the others (to resume)."),
):
    """Encode audio to EnCodec codes: OUT/<name>.npz with codes (n_codebooks x frames, int16) and metadata."""
    from toolkit import console
    from toolkit.audio import codec as codec_lib
    from toolkit.audio.codes import CodeFile, save_codes
    from toolkit.audio.io import audio_info, find_audio, read_audio, sha256_file

    if chunk_seconds <= 0 or context_seconds < 0 or batch_size < 1:
        raise UserError("--chunk-seconds must be > 0, --context-seconds >= 0 and --batch-size >= 1")
    jobs, seen = [], {}
    for path, rel in find_audio(inputs):
        target = out / rel.with_suffix(".npz")
        if target in seen:
            raise UserError(f"{path} and {seen[target]} would both be written to {target}; encode them separately")
        seen[target] = path
        jobs.append((path, target))
    existing = [t for _, t in jobs if t.exists()]
    if existing and not (force or skip_existing):
        raise UserError(f"{existing[0]} already exists ({len(existing)} of {len(jobs)} code files do); pass --force "
                        "to replace them or --skip-existing to keep them")
    if skip_existing and not force:
        jobs = [(p, t) for p, t in jobs if not t.exists()]
    if not jobs:
        info("nothing to encode: every code file exists")
        return
    durations = [audio_info(p).duration for p, _ in jobs]
    cd = codec_lib.load_codec(codec, device)
    n_q = cd.n_codebooks(bandwidth)
    with console.progress() as bar:
        task = bar.add_task(f"encode {len(jobs)} file(s)", total=sum(durations))
        for path, target in jobs:
            audio = read_audio(path, cd.sample_rate)
            codes = codec_lib.encode(cd, audio, bandwidth, chunk_seconds, context_seconds, batch_size,
                                     on_progress=lambda seconds: bar.advance(task, seconds))
            save_codes(target, CodeFile(codes=codes, sample_rate=cd.sample_rate, frame_rate=cd.frame_rate,
                                        bandwidth=bandwidth, num_samples=len(audio), codec=cd.name, source=path.name,
                                        sha256=sha256_file(path), source_path=str(path.resolve())))
    info(f"{out}: {len(jobs)} code file(s), {n_q} codebooks at {cd.frame_rate:g} Hz, {sum(durations):,.1f} s of audio")


@app.command("score")
def score(
    inputs: list[Path] = typer.Argument(..., help="Code files or folders of them (from `lmkit audio encode`)."),
    out: Path = typer.Option(..., "--out", "-o", help="The Parquet file to write: one row per (file, chunk)."),
    chunk_frames: int = typer.Option(54, help="Code frames per chunk (54 = half a 4/4 measure at 165 BPM, "
                                     "about 0.72 s at 75 Hz)."),
    weights: str = typer.Option("0.7,0.3", help="NOVELTY,STABILITY weights: priority = n * novelty + "
                                "s * (1 - stability)^2."),
    audio_dir: list[Path] = typer.Option([], "--audio-dir", help="Where to look for the source audio when it has "
                                         "moved since encoding (repeatable; matched by name and sha256)."),
    decode: bool = typer.Option(False, "--decode", help="Score the decoded codes when the source audio is missing "
                                "(needs the codec)."),
    codec: str = typer.Option("", "--codec", help=CODEC_HELP + " With --decode; default: the one in the code file."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing Parquet file."),
):
    """Score every chunk of every file (RMS, spectral flux, novelty, stability, priority, silence) into Parquet."""
    from toolkit import console
    from toolkit.audio.codes import find_code_files, load_codes
    from toolkit.audio.score import ScoreConfig, score_code_files

    try:
        w_n, w_s = (float(x) for x in weights.split(","))
    except ValueError:
        raise UserError(f"--weights {weights!r}: expected two numbers NOVELTY,STABILITY, e.g. 0.7,0.3") from None
    cfg = ScoreConfig(chunk_frames=chunk_frames, novelty_weight=w_n, stability_weight=w_s)
    paths = find_code_files(inputs)
    cd = None
    if decode:
        from toolkit.audio.codec import load_codec

        cd = load_codec(codec or load_codes(paths[0]).codec, device)
    with console.progress() as bar:
        task = bar.add_task(f"score {len(paths)} file(s)", total=len(paths))
        summary = score_code_files(paths, out, cfg, audio_dir, cd, overwrite=force,
                                   on_file=lambda path, cf: bar.advance(task))
    info(f"{out}: {summary['chunks']:,} chunks of {chunk_frames} frames from {summary['files']} file(s), "
         f"{summary['silent']:,} silent")


@app.command("decode")
def decode(
    codes_file: Path = typer.Argument(..., help="A code file from `lmkit audio encode`."),
    out: Path = typer.Option(..., "--out", "-o", help="The audio file to write (.wav or .flac, 16-bit)."),
    codebooks: int = typer.Option(0, help="Decode only the first N codebooks (1 = the seed's codebook-0 audio); "
                                  "0 = all."),
    codec: str = typer.Option("", "--codec", help=CODEC_HELP + " Default: the one named in the code file."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
):
    """Decode a code file back to audio at the codec's sample rate."""
    from toolkit import console
    from toolkit.audio import codec as codec_lib
    from toolkit.audio.codes import load_codes
    from toolkit.audio.io import write_audio

    cf = load_codes(codes_file)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if out.suffix.lower() not in (".wav", ".flac"):
        raise UserError(f"-o {out}: expected a .wav or .flac file name")
    cd = codec_lib.load_codec(codec or cf.codec, device)
    if cd.sample_rate != cf.sample_rate:
        raise UserError(f"{codes_file} was made by a {cf.sample_rate} Hz codec; {cd.name} is {cd.sample_rate} Hz")
    with console.progress() as bar:
        task = bar.add_task("decode", total=cf.frames / cf.frame_rate)
        audio = codec_lib.decode(cd, cf.codes, codebooks or None, on_progress=lambda s: bar.advance(task, s))
    write_audio(out, audio[: cf.num_samples], cd.sample_rate)
    info(f"{out}: {cf.duration:.2f} s at {cd.sample_rate} Hz from {codebooks or cf.n_codebooks} of "
         f"{cf.n_codebooks} codebooks")


@app.command("info")
def info_cmd(codes_file: Path = typer.Argument(..., help="A code file from `lmkit audio encode`.")):
    """Print what is in a code file."""
    import numpy as np

    from toolkit.audio.codes import load_codes

    cf = load_codes(codes_file)
    distinct = [int(len(np.unique(row))) for row in cf.codes]
    rows = [
        ("file", str(codes_file)),
        ("source", cf.source or "(unknown)"),
        ("source sha256", cf.sha256 or "(unknown)"),
        ("duration", f"{cf.duration:.3f} s ({cf.num_samples:,} samples at {cf.sample_rate} Hz)"),
        ("codes", f"{cf.n_codebooks} codebooks x {cf.frames:,} frames (int16)"),
        ("frame rate", f"{cf.frame_rate:g} Hz"),
        ("bandwidth", f"{cf.bandwidth:g} kbps"),
        ("codec", cf.codec),
        ("distinct codes", " ".join(str(d) for d in distinct)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


@app.command("rollout")
def rollout_cmd(
    audio: Optional[Path] = typer.Argument(None, help="An audio file to take prompts from (encoded and scored in "
                                           "memory); or leave it out and give --from-codes."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A run folder of a T5 trained on audio codes "
                                         "(codebook0); or --server."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the wavs, the tapes (.npz) and rollout.json."),
    from_codes: Optional[Path] = typer.Option(None, "--from-codes", help="Take prompts from the code files scored in "
                                              "DIR/scores.parquet instead (the seed's in-distribution prompts)."),
    samples: int = typer.Option(4, help="Tapes rolled out, each from its own prompt."),
    prompt_length: int = typer.Option(128, help="Tokens per prompt, and the context each iteration sees."),
    iterations: int = typer.Option(12, help="Continuation / in-fill steps per tape."),
    tokens_per_step: int = typer.Option(512, help="Continuation: most new tokens per iteration (it stops earlier "
                                        "at EOS or a sentinel)."),
    infill_prob: float = typer.Option(0.0, help="Probability that an iteration is an in-fill (the tape gets "
                                      "[generated, last half of the context])."),
    infill_length: int = typer.Option(512, help="In-fill: most generated tokens."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(250, help="Sample among the k likeliest tokens (0 = all)."),
    seed: int = typer.Option(420420, help="Seeds the prompt choice, the modes and the sampling."),
    codec: str = typer.Option("", "--codec", help=CODEC_HELP + f" Default: {DEFAULT_CODEC} (with --from-codes: "
                              "the one named in the code files)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace the files of an earlier rollout in OUT."),
    server: Optional[str] = typer.Option(None, "--server", help="Run it on an `lmkit serve` of a T5 audio run at URL "
                                         "instead: AUDIO is uploaded (--from-codes names a folder on the server), "
                                         "the job is followed with a progress bar and its files fetched into OUT."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMKIT_API_KEY", show_envvar=True,
                                          help="With --server: sent as 'Authorization: Bearer KEY'."),
    job: Optional[str] = typer.Option(None, "--job", help="With --server: follow and fetch an earlier job (its id) "
                                      "instead of submitting one."),
):
    """Extend prompts from high-priority chunks with a T5 (continuation / in-fill "tape"), decode to wav; locally
    (--model) or as a job on a server (--server)."""
    from dataclasses import asdict

    from toolkit.audio.rollout import RolloutSettings, rollout

    settings = RolloutSettings(samples=samples, prompt_length=prompt_length, iterations=iterations,
                               tokens_per_step=tokens_per_step, infill_prob=infill_prob, infill_length=infill_length,
                               temperature=temperature, top_k=top_k, seed=seed)
    if (model is None) == (server is None):
        raise UserError("give exactly one of --model RUN (roll out here) or --server URL (on a server)")
    if server is not None:
        from toolkit.serve.client import Client, remote_rollout

        if device != "auto":
            raise UserError("--device is the server's (lmkit serve --device); leave it out with --server")
        done = remote_rollout(Client(server, api_key), out, asdict(settings), audio=audio,
                              from_codes=str(from_codes) if from_codes else None, codec=codec, job_id=job, force=force)
        report = done["report"] or {}
        info(f"{out}: job {done['id']}: {len(done['files'])} file(s), {report.get('seconds_generated', 0):.1f} s of "
             f"audio generated on the server in {report.get('generate_seconds', 0):.1f} s")
        return
    if job is not None:
        raise UserError("--job is for --server")
    report = rollout(model, out, settings, audio_path=audio, from_codes=from_codes, codec_name=codec, device=device,
                     force=force)
    info(f"{out}: {samples} tape(s), {report['seconds_generated']:.1f} s of audio generated in "
         f"{report['generate_seconds']:.1f} s ({report['seconds_per_audio_second'] or 0:.2f} s per second of audio)")


@app.command("jobs")
def jobs_cmd(
    server: str = typer.Option(..., "--server", help="An `lmkit serve` of a T5 audio run, e.g. http://host:8000."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMKIT_API_KEY", show_envvar=True,
                                          help="Sent as 'Authorization: Bearer KEY'."),
):
    """List a server's audio rollout jobs, newest first: id, status, progress, source."""
    import time

    from toolkit.serve.client import Client

    jobs = Client(server, api_key).jobs()
    if not jobs:
        info(f"{server}: no audio rollout jobs")
        return
    for j in jobs:
        p = j["progress"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created"]))
        line = f"{j['id']}  {j['status']:<7}  {p['done']}/{p['total']}  {when}  {j['source']}"
        print(line + (f"  ({j['error']})" if j.get("error") else ""))
