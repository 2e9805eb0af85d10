"""`lmkit audio rollout`: extend prompts from an audio file with a T5 trained on codes (the seed's
`sample_audio_t5.py`, "tape" rollout).

Prompts: the audio is encoded and scored in memory (toolkit/audio/codec.py, score.py); `samples` chunks are
drawn with probability ∝ priority_score and a prompt of `prompt_length` tokens is cut centred on each chunk's
middle frame (clamped inside the file). With `from_codes` the chunks come from a scores Parquet over training
code files instead (the seed's in-distribution prompts).

Tape: each sample's tape starts as its prompt. Each iteration is a continuation (probability 1 - infill_prob)
or an in-fill, the same mode for every sample:
  continuation  encoder [context, <s_0>] with context = the tape's last prompt_length tokens; the decoder starts
                from [bos, <s_0>] and samples up to tokens_per_step tokens, stopping at EOS or any other special
                (a sentinel, pad, bos); the new tokens are appended
  in-fill       prefix, postfix = the first and last half of the context; encoder [prefix, <s_0>, postfix];
                up to infill_length tokens are generated and [generated, postfix] is appended, so the postfix
                "motif" recurs (the seed's additive in-fill)
Generation is toolkit.generate.stream over `model.condition(encoder ids)` (the encoder's output and the
cross-attention keys and values computed once per step), with one random Generator for the whole rollout.
Only the codebook0 layout (the seed's) is supported so far.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toolkit import console
from toolkit.errors import UserError
from toolkit.fsio import atomic_write, atomic_write_json


@dataclass(frozen=True)
class RolloutSettings:
    samples: int = 4  # tapes rolled out side by side
    prompt_length: int = 128  # tokens of the prompt, and of the context each iteration sees
    iterations: int = 12
    tokens_per_step: int = 512  # continuation: most new tokens per iteration
    infill_prob: float = 0.0  # probability that an iteration is an in-fill rather than a continuation
    infill_length: int = 512  # in-fill: most generated tokens
    temperature: float = 1.0
    top_k: int = 250
    seed: int = 420420

    def __post_init__(self):
        for name in ("samples", "prompt_length", "iterations", "tokens_per_step", "infill_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive number")
        if self.prompt_length < 2:
            raise UserError(f"--prompt-length {self.prompt_length}: expected at least 2 tokens")
        if not 0.0 <= self.infill_prob <= 1.0:
            raise UserError(f"--infill-prob {self.infill_prob}: expected a probability in [0, 1]")
        if self.temperature < 0 or self.top_k < 0:
            raise UserError("--temperature and --top-k must be >= 0")


def check_model(run) -> None:
    """The run must be an encoder-decoder over the audio tokenizer's codebook0 layout."""
    tok = run.tokenizer
    if getattr(tok, "kind", None) != "audio":
        raise UserError(f"{run.path} was trained with a {tok.kind} tokenizer; rollout needs a model trained on audio "
                        "codes (tokenizer kind \"audio\")")
    if tok.layout != "codebook0":
        raise UserError(f"{run.path}: audio layout {tok.layout!r} is not supported by rollout yet (only \"codebook0\", "
                        "the seed's)")
    if not run.model.is_encoder_decoder:
        raise UserError(f"{run.path} is a {run.recipe.model.family} model; rollout needs a T5 encoder-decoder "
                        "(model family \"t5\")")


def check_codec(codec, tok) -> None:
    if codec.codebook_size != tok.codebook_size:
        raise UserError(f"codec {codec.name} has codebooks of {codec.codebook_size} codes but the model was trained on "
                        f"{tok.codebook_size}")


def limits(config, s: RolloutSettings) -> tuple[int, int]:
    """New tokens per continuation and per in-fill, clipped to what the decoder holds after [bos, <s_0>]."""
    if s.prompt_length + 1 > config.max_seq_len:
        raise UserError(f"--prompt-length {s.prompt_length}: the model's encoder takes {config.max_seq_len} tokens, "
                        f"so the context plus a sentinel allows at most {config.max_seq_len - 1}")
    target_len = getattr(config, "target_len", 0) or config.max_target_len  # t5: max_target_len 0 = max_seq_len
    room = target_len - 2
    if room < 1:
        raise UserError(f"the model's decoder length ({target_len}) leaves no room to generate")
    return min(s.tokens_per_step, room), min(s.infill_length, room)


# --- prompts --------------------------------------------------------------------------------------------


def centred_prompts(tokens: list[np.ndarray], file_of: np.ndarray, middle: np.ndarray, length: int) -> np.ndarray:
    """(N, length) windows of tokens[file_of[i]] centred on frame middle[i] (codebook0: a frame is a token),
    clamped inside the file."""
    out = np.empty((len(file_of), length), dtype=np.int64)
    for i, (f, m) in enumerate(zip(file_of, middle)):  # one slice per sample
        ids = tokens[f]
        start = int(np.clip(m - length // 2, 0, len(ids) - length))
        out[i] = ids[start : start + length]
    return out


def prompts_from_audio(audio: np.ndarray, codec, tok, s: RolloutSettings, rng: np.random.Generator, name: str
                       ) -> tuple[np.ndarray, list[dict]]:
    """Encode and score `audio` in memory, then cut prompts centred on chunks drawn ∝ priority."""
    from toolkit.audio.codec import encode
    from toolkit.audio.score import score_audio

    codes = encode(codec, audio, min(codec.bandwidths))  # codebook 0 is the same at every bandwidth
    ids = tok.encode_codes(codes)
    if len(ids) < s.prompt_length:
        raise UserError(f"{name}: {codes.shape[1]} frames ({len(audio) / codec.sample_rate:.2f} s) are fewer than "
                        f"--prompt-length {s.prompt_length} tokens")
    scores = score_audio(audio, codes.shape[1], codec.hop)
    p = scores["priority_score"] / scores["priority_score"].sum()
    chunks = rng.choice(len(p), size=s.samples, p=p)
    middle = (scores["frame_start"][chunks] + scores["frame_end"][chunks]) // 2
    prompts = centred_prompts([ids], np.zeros(s.samples, dtype=np.int64), middle, s.prompt_length)
    where = [{"file": name, "chunk": int(c), "middle_frame": int(m), "seconds": round(m / codec.frame_rate, 3)}
             for c, m in zip(chunks, middle)]
    return prompts, where


def prompts_from_codes(codes_dir: Path, tok, s: RolloutSettings, rng: np.random.Generator
                       ) -> tuple[np.ndarray, list[dict], str, float]:
    """Prompts from code files, centred on chunks of codes_dir/scores.parquet drawn ∝ priority.
    Returns (prompts, where, the codec named in the code files, their frame rate)."""
    from toolkit.audio.codes import load_codes
    from toolkit.shards.sampler import read_scores

    table = read_scores(Path(codes_dir) / "scores.parquet")
    p = table["priority_score"].clip(0, None)
    p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1 / len(p))
    chunks = rng.choice(len(p), size=s.samples, p=p)
    drawn = table["file"][chunks]  # indices into table["paths"]
    names = sorted(set(drawn.tolist()))
    files = {n: load_codes(table["paths"][n]) for n in names}
    tokens = [tok.encode_codes(files[n].codes) for n in names]
    short = [table["paths"][n] for n, ids in zip(names, tokens) if len(ids) < s.prompt_length]
    if short:
        raise UserError(f"{short[0]}: fewer frames than --prompt-length {s.prompt_length} tokens")
    file_of = np.searchsorted(names, drawn)
    middle = (table["frame_start"][chunks] + table["frame_end"][chunks]) // 2
    prompts = centred_prompts(tokens, file_of, middle, s.prompt_length)
    first = files[names[0]]
    where = [{"file": table["paths"][n], "middle_frame": int(m), "seconds": round(m / files[n].frame_rate, 3)}
             for n, m in zip(drawn.tolist(), middle)]
    return prompts, where, first.codec, first.frame_rate


# --- the tape -------------------------------------------------------------------------------------------


def extend_tapes(model, prompts: np.ndarray, s: RolloutSettings, rng: np.random.Generator,
                 generator: np.random.Generator, code_ids: int, on_step=None) -> tuple[list[list[int]], list[dict]]:
    """Roll out one tape per prompt for s.iterations; returns the tapes and, per iteration, its mode and the
    new tokens per sample. Ids at or above `code_ids` (the specials) end a generation."""
    import torch

    from toolkit.generate import Sampling, stream

    c = model.config
    max_continue, max_infill = limits(c, s)
    stops = tuple(range(code_ids, c.vocab_size))  # pad, EOS, the sentinels and BOS: every id after the codes
    sampling = Sampling(temperature=s.temperature, top_k=s.top_k)
    device = next(model.parameters()).device
    s0 = c.sentinel_start
    infill = rng.random(s.iterations) < s.infill_prob  # one mode per iteration, shared by the samples
    tapes = [list(map(int, p)) for p in prompts]
    log = []
    for it in range(s.iterations):
        mode = "infill" if infill[it] else "continue"
        added = []
        for tape in tapes:
            context = tape[-s.prompt_length :]
            half = len(context) // 2
            enc = context + [s0] if mode == "continue" else context[:half] + [s0] + context[half:]
            with torch.inference_mode():
                cond = model.condition(torch.tensor([enc], dtype=torch.long, device=device))
            new = list(stream(cond, [c.bos_id, s0], max_continue if mode == "continue" else max_infill, sampling,
                              stop_ids=stops, generator=generator))
            tape.extend(new if mode == "continue" else new + context[half:])
            added.append(len(new))
            if on_step is not None:
                on_step()
        log.append({"mode": mode, "new_tokens": added})
    return tapes, log


# --- the command ----------------------------------------------------------------------------------------


def output_paths(out: Path, stem: str, n: int) -> list[Path]:
    paths = [out / f"{stem}_{i}_{kind}.wav" for i in range(n) for kind in ("prompt", "rollout")]
    return paths + [out / f"{stem}_rollout.npz", out / "rollout.json"]


def prompts_and_codec(tok, s: RolloutSettings, rng: np.random.Generator, codec_for, audio_path: Path | None = None,
                      from_codes: Path | None = None, codec_name: str = "", name: str = ""):
    """The prompt windows (from an audio file, encoded and scored in memory, or from scored code files) and the
    codec that decodes them; `codec_for(name)` loads (or reuses) a codec. Returns (prompts, where, codec)."""
    from toolkit.audio import DEFAULT_CODEC
    from toolkit.audio.io import read_audio

    if audio_path is not None:
        codec = codec_for(codec_name or DEFAULT_CODEC)
        check_codec(codec, tok)
        audio = read_audio(audio_path, codec.sample_rate)
        console.info(f"prompts: encoding and scoring {name or audio_path} ({len(audio) / codec.sample_rate:.1f} s)")
        prompts, where = prompts_from_audio(audio, codec, tok, s, rng, name or str(audio_path))
        return prompts, where, codec
    prompts, where, named_codec, frame_rate = prompts_from_codes(Path(from_codes), tok, s, rng)
    codec = codec_for(codec_name or named_codec)
    check_codec(codec, tok)
    if abs(codec.frame_rate - frame_rate) > 1e-6:
        raise UserError(f"{name or from_codes}: codes at {frame_rate:g} Hz, but {codec.name} makes "
                        f"{codec.frame_rate:g} Hz")
    return prompts, where, codec


def write_rollout(out: Path, stem: str, tok, codec, prompts: np.ndarray, tapes: list, log: list,
                  s: RolloutSettings) -> np.ndarray:
    """The prompt and rollout wavs of each sample and the tapes .npz; returns each tape's length in frames."""
    from toolkit.audio.codec import decode
    from toolkit.audio.io import write_audio

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codes = [tok.decode_codes(np.asarray(t, dtype=np.int64)) for t in tapes]
    prompt_codes = [tok.decode_codes(p) for p in prompts]
    for i in range(s.samples):
        write_audio(out / f"{stem}_{i}_prompt.wav", decode(codec, prompt_codes[i], n_codebooks=1), codec.sample_rate)
        write_audio(out / f"{stem}_{i}_rollout.wav", decode(codec, codes[i], n_codebooks=1), codec.sample_rate)
    frames = np.array([c.shape[1] for c in codes], dtype=np.int64)
    padded = np.full((s.samples, 1, frames.max()), -1, dtype=np.int16)
    for i, c in enumerate(codes):
        padded[i, :, : c.shape[1]] = c

    def write_tapes(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # numpy arrays only (no pickles); tapes[i, :, :tape_frames[i]] is sample i
            np.savez_compressed(f, tapes=padded, tape_frames=frames, prompts=np.stack(prompt_codes),
                                modes=np.array([e["mode"] for e in log]),
                                new_tokens=np.array([e["new_tokens"] for e in log],
                                                    dtype=np.int64).reshape(-1, s.samples),
                                sample_rate=np.int64(codec.sample_rate), frame_rate=np.float64(codec.frame_rate),
                                codec=np.str_(codec.name))

    atomic_write(out / f"{stem}_rollout.npz", write_tapes)
    return frames


def rollout_report(run, source: str, mode: str, codec, s: RolloutSettings, where, log, frames: np.ndarray,
                   gen_seconds: float, t0: float) -> dict:
    """What rollout.json says: the model, the prompts' places, each iteration, the speed."""
    generated = float((frames - s.prompt_length).sum() / codec.frame_rate)
    return {
        "model": str(run.path), "step": run.step, "source": source, "mode": mode, "codec": codec.name,
        "device": str(next(run.model.parameters()).device), "settings": asdict(s), "prompts": where,
        "iterations": log, "tape_frames": frames.tolist(), "seconds_generated": round(generated, 3),
        "generate_seconds": round(gen_seconds, 3), "wall_seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_audio_second": round(gen_seconds / generated, 3) if generated > 0 else None,
    }


def rollout(run_dir: Path, out: Path, s: RolloutSettings, audio_path: Path | None = None,
            from_codes: Path | None = None, codec_name: str = "", device: str = "auto", force: bool = False) -> dict:
    """Load the run and the codec, pick prompts, roll out, write the wavs, the tapes and rollout.json."""
    from toolkit.audio.codec import load_codec, resolve_device
    from toolkit.generate import make_generator
    from toolkit.run import load_run

    if (audio_path is None) == (from_codes is None):
        raise UserError("give exactly one of AUDIO (a file to take prompts from) or --from-codes DIR")
    t0 = time.perf_counter()
    stem = Path(audio_path).stem if audio_path is not None else Path(from_codes).resolve().name
    paths = output_paths(Path(out), stem, s.samples)
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to replace the rollout in {out}")
    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    check_model(run)
    limits(run.model.config, s)  # fail before encoding anything
    tok = run.tokenizer
    rng = np.random.Generator(np.random.PCG64(s.seed))
    prompts, where, codec = prompts_and_codec(tok, s, rng, lambda name: load_codec(name, str(dev)), audio_path,
                                              from_codes, codec_name)
    t_gen = time.perf_counter()
    with console.progress() as bar:
        task = bar.add_task(f"rollout {s.samples} x {s.iterations}", total=s.samples * s.iterations)
        tapes, log = extend_tapes(run.model, prompts, s, rng, make_generator(s.seed), tok.pad_id,
                                  on_step=lambda: bar.advance(task))
    gen_seconds = time.perf_counter() - t_gen
    frames = write_rollout(Path(out), stem, tok, codec, prompts, tapes, log, s)
    report = rollout_report(run, str(audio_path or from_codes), "audio" if audio_path is not None else "codes", codec,
                            s, where, log, frames, gen_seconds, t0)
    report["model"] = str(run_dir)
    atomic_write_json(Path(out) / "rollout.json", report)
    return report
