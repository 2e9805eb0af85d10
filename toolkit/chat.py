"""Chat with a run folder or a llama2.c model.bin: a prompt_toolkit REPL, or one-shot for scripts and pipes.

A base model (recipe data.chat_template = "") runs in plain completion mode: each input is a prompt it
continues. A model fine-tuned on conversations chats in the template it was trained with (llama2 or qa).
The prompt never overflows max_seq_len: the oldest turns are dropped first, then the system prompt, then
the start of the current turn; the current turn is in the prompt exactly once (the seed had it twice).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from rich.text import Text

from toolkit import generate as G
from toolkit.console import console, info
from toolkit.data import chat_template as T
from toolkit.errors import UserError

HELP = """commands:
  /reset              forget the conversation
  /system [TEXT]      set (or, without TEXT, clear) the system prompt; resets the conversation
  /temperature T      sampling temperature (0 = greedy)
  /help               this help
  /quit               leave (also Ctrl-D)
Enter sends; Alt-Enter (Esc then Enter) starts a new line; Ctrl-C stops a reply or clears the line."""


@dataclass
class Target:
    model: object
    tokenizer: object
    recipe: object
    name: str

    @property
    def template(self) -> str:
        return getattr(self.recipe.data, "chat_template", "") if self.recipe is not None else ""


def accelerator_possible() -> bool:
    """Whether torch could find a GPU here, told without importing torch (two seconds of a short reply): an NVIDIA
    or AMD driver (Linux), Apple silicon (MPS), or a system this does not know. A wrong yes costs the import; a
    wrong no chats on the CPU."""
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))
    return True


def load_target(path: str | Path, tokenizer: Path | None = None, device: str = "cpu", numpy: bool = False) -> Target:
    """A run folder, a Hugging Face llama folder, a .gguf file, or a llama2.c model.bin (with -z tokenizer.bin, or
    the one beside it). `device`: auto, cpu, cuda[:N] or mps. `numpy`: where that is the CPU, a standard fp32
    llama in a run folder or a .bin loads as a llama_cpu.NumpyLlama, without importing torch (`lmkit chat` and
    `lmkit serve`: start-up, and one copy of the weights instead of torch's and the numpy decoder's)."""
    from toolkit.run import is_run, load_run

    if numpy and (device == "cpu" or (device == "auto" and not accelerator_possible())):
        device = "numpy"  # load_run and open_bin: the numpy model where there is one, else torch on the CPU
    else:
        from toolkit.device import resolve_device

        device = str(resolve_device(device))
    torch_device = "cpu" if device == "numpy" else device
    path = Path(path)
    if path.is_dir() and not is_run(path) and (path / "config.json").is_file():
        from toolkit.export import open_hf

        if tokenizer is not None:
            raise UserError("-z/--tokenizer is for a llama2.c .bin; a Hugging Face folder has its own tokenizer")
        opened = open_hf(path, torch_device)
        return Target(opened.model, opened.tokenizer, opened.recipe, str(path))
    if path.is_dir():
        if not is_run(path):
            raise UserError(f"{path} is not a run folder (needs model.safetensors and recipe.toml) nor a Hugging "
                            "Face model folder (config.json)")
        if tokenizer is not None:
            raise UserError("-z/--tokenizer is for a llama2.c .bin; a run folder has its own tokenizer/")
        run = load_run(path, device)
        if run.model.is_encoder_decoder:
            raise UserError(f"{path} is a T5 span-denoising model, not a chat model: fill masked spans with "
                            "benchmarks/t5_denoise.py, or roll out audio with `lmkit audio rollout`")
        return Target(run.model, run.tokenizer, run.recipe, str(path))
    if path.is_file() and path.suffix.lower() == ".gguf":
        from toolkit.export import open_gguf

        if tokenizer is not None:
            raise UserError("-z/--tokenizer is for a llama2.c .bin; a .gguf carries its own vocabulary")
        opened = open_gguf(path, torch_device)
        return Target(opened.model, opened.tokenizer, opened.recipe, str(path))
    if path.is_file():
        from toolkit.export import open_bin

        opened = open_bin(path, tokenizer, device)
        return Target(opened.model, opened.tokenizer, opened.recipe, str(path))
    raise UserError(f"not found: {path} (give a run folder, a Hugging Face folder, a .gguf or a llama2.c model.bin)")


def set_dtype(target: Target, dtype: str) -> None:
    """Generate with the target's weights in `dtype` (toolkit.models.cast_for_decoding)."""
    from toolkit.models import cast_for_decoding

    try:
        target.model = cast_for_decoding(target.model, dtype)
    except ValueError as e:
        raise UserError(f"--dtype {dtype}: {e}") from None


RUNC_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 0.9}  # run.c's defaults


def sampling_for(target: Target, seed: int | None = None, **given) -> G.Sampling:
    """The sampling settings for a target: what the user gave (None = not given), else the model family's own
    sampler (e.g. BoggersTheLLM's top-k 28 and repeat penalties), else run.c's defaults."""
    options = dict(RUNC_SAMPLING)
    family = target.model.sampling_defaults()
    if family:
        options.update(family, top_p=1.0)
    options.update({k: v for k, v in given.items() if v is not None})
    try:
        return G.Sampling(**options, seed=seed)
    except ValueError as e:
        raise UserError(f"sampling: {e}") from None


@dataclass
class Session:
    target: Target
    sampling: G.Sampling = field(default_factory=G.Sampling)
    max_new_tokens: int = 256
    system: str = ""
    template: str = ""  # "" = completion mode
    history: list[dict] = field(default_factory=list)  # finished user/assistant turns

    def __post_init__(self):
        self.tok = self.target.tokenizer
        self.max_len = self.target.model.config.max_seq_len
        self.stops = G.stop_ids_for(self.tok)

    @functools.cached_property
    def decoder(self):
        """Made on the first reply: a session used only to build prompts (the server's) never needs one."""
        return G.decoder_for(self.target.model)

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, text: str) -> tuple[list[int], list[str]]:
        """The ids for this input, fitted to the context (room for an answer kept), and notes on what was cut."""
        reserve = max(1, min(self.max_new_tokens, self.max_len // 2))
        budget = self.max_len - reserve
        notes = []
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        if not self.template:
            ids = bos + self.tok.encode(text)
        else:
            system = self.system
            while True:
                msgs = ([{"role": "system", "content": system}] if system else []) + self.history
                ids = T.encode_prompt(self.tok, msgs + [{"role": "user", "content": text}], self.template)
                if len(ids) <= budget:
                    break
                if self.history:
                    del self.history[:2]  # the oldest user/assistant pair
                    notes.append("dropped the oldest turn to fit the context")
                elif system:
                    system = ""
                    notes.append("left out the system prompt to fit the context")
                else:
                    break
        if len(ids) > budget:
            keep = budget - len(bos)
            notes.append(f"kept the last {keep} of {len(ids) - len(bos)} prompt tokens (context {self.max_len})")
            ids = bos + ids[len(ids) - keep :]
        return ids, notes

    def reply(self, text: str, write: Callable[[str], None]) -> tuple[str, G.Stats]:
        """Generate the answer to `text`, passing text pieces to `write` as they come. Ctrl-C (KeyboardInterrupt)
        stops it; what was said so far is kept."""
        ids, notes = self.prompt_ids(text)
        for note in notes:
            info(f"({note})", style="dim")
        stats = G.Stats()
        stream = G.TextStream(self.tok, ids)
        stop_text = T.stop_text(self.template) if self.template else None
        out = G.StopText(stop_text)
        gen = G.stream(self.decoder, ids, self.max_new_tokens, self.sampling, self.stops, stats)
        lead = bool(self.template)  # an answer's first token carries the dummy-prefix space: not shown
        try:
            for token in gen:
                piece = stream.push(token)
                if lead and piece:
                    piece, lead = piece.lstrip(" "), False
                piece = out.feed(piece)
                if piece:
                    write(piece)
                if out.stopped:
                    stats.stop = "stop"
                    break
            else:
                tail = stream.flush()
                tail = out.feed(tail.lstrip(" ") if lead else tail) + out.flush()
                if tail:
                    write(tail)
        except KeyboardInterrupt:
            stats.stop = "interrupted"
        finally:
            gen.close()
        answer = out.text
        if self.template:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]
        return answer, stats




def _stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def one_shot(session: Session, text: str, echo: bool = False) -> G.Stats:
    """Print only the generated text (and a newline) to stdout; stats go to stderr."""
    if echo:
        _stdout(text)
    _, stats = session.reply(text, _stdout)
    _stdout("\n")
    info(f"{_speed(stats, session.decoder)} ({stats.stop})", style="dim")
    return stats


def _speed(stats: G.Stats, decoder=None) -> str:
    """Tokens/s as run.c reports it (after the first token), the prompt's processing time, and which decode step
    ran (a llama on the CPU: C or numpy)."""
    step = getattr(decoder, "backend", None)
    threads = getattr(decoder, "threads", None)
    where = f" ({step} step, {decoder.dtype}{f', {threads} threads' if threads else ''})" if step else ""
    return (f"{stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s{where}, "
            f"prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds * 1000:.0f} ms")


def history_file() -> Path:
    root = Path(os.environ.get("LMKIT_CACHE") or Path.home() / ".cache" / "lmkit")
    root.mkdir(parents=True, exist_ok=True)
    return root / "chat_history"


def repl(session: Session) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    prompt = PromptSession(history=FileHistory(str(history_file())), key_bindings=kb, multiline=False)
    c = session.target.model.config
    mode = f"chat template {session.template!r}" if session.template else "completion mode (a base model)"
    console.print(Text.assemble((session.target.name, "bold"), f": {session.target.model.num_params():,} parameters, "
                                f"context {c.max_seq_len}, {mode}. /help for commands, Ctrl-D to leave."))
    while True:
        try:
            text = prompt.prompt("you> " if session.template else "prompt> ", multiline=False)
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        if not text.strip():
            continue
        if text.startswith("/"):
            if not command(session, text.strip()):
                break
            continue
        if session.template:
            _stdout("assistant: ")
        _, stats = session.reply(text, _stdout)
        _stdout("\n")
        note = " (interrupted)" if stats.stop == "interrupted" else ""
        console.print(f"{_speed(stats, session.decoder)}{note}", style="dim")


def command(session: Session, line: str) -> bool:
    """Run a /command; False means leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        console.print(HELP, markup=False)
    elif name == "/reset":
        session.reset()
        console.print("(conversation cleared)")
    elif name == "/system":
        session.system = arg
        session.reset()
        console.print(f"(system prompt {'set' if arg else 'cleared'}; conversation cleared)")
        if not session.template:
            console.print("(a base model in completion mode ignores the system prompt)")
    elif name == "/temperature":
        try:
            session.sampling = replace(session.sampling, temperature=float(arg))
            console.print(f"(temperature {session.sampling.temperature})")
        except ValueError:
            console.print("usage: /temperature T   (a number >= 0; 0 = greedy)")
    else:
        console.print(f"unknown command {name}; /help lists them")
    return True
