"""`lmkit chat RUN_OR_BIN`: the REPL, or one-shot with --prompt or piped stdin."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from toolkit.console import info
from toolkit.errors import UserError


def chat(
    target: str = typer.Argument(..., help="A run folder, a Hugging Face llama folder, a .gguf, or a llama2.c model.bin "
                                "(v0, v1 or v2)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", "-z", help="llama2.c tokenizer.bin for a .bin model "
                                   "(default: the one beside it). A tokenizer.model of the same name beside it "
                                   "is preferred when it matches."),
    prompt: str = typer.Option(None, "--prompt", "-i", help="One-shot: generate for this text, print only the "
                               "generated text to stdout and exit. Piped stdin does the same."),
    steps: int = typer.Option(256, "--max-new-tokens", "-n", help="At most this many new tokens per reply."),
    temperature: float = typer.Option(None, "--temperature", "-t", help="0 = greedy (default 1.0, or the recipe's)."),
    top_k: int = typer.Option(None, "--top-k", help="Sample from the k most likely tokens (default off, or the "
                              "recipe's)."),
    top_p: float = typer.Option(None, "--top-p", "-p", help="Nucleus sampling (0 or 1 = off; default run.c's 0.9, "
                                "off when the recipe sets top-k)."),
    repeat_penalty: float = typer.Option(None, "--repeat-penalty", help="Subtract this from the logits of each of "
                                         "the last 4 generated tokens (default 0, or the recipe's)."),
    seed: int = typer.Option(None, "--seed", "-s", help="Random seed (default: from the clock)."),
    system: str = typer.Option("", "--system", "-y", help="System prompt (models fine-tuned with a chat template)."),
    echo: bool = typer.Option(False, "--echo", help="One-shot: print the prompt before the generated text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default), bfloat16 or int8: the weights each "
                              "token reads. On the CPU a llama's C decode step reads half the bytes in bfloat16 and "
                              "a quarter in int8 (one scale per row), faster where memory bandwidth rules; the "
                              "text can differ from float32's after a few dozen tokens."),
):
    """Chat with a model: a REPL with history and /commands; a base model continues your text, a fine-tuned
    one answers in its chat template. With --prompt or piped stdin: one reply on stdout, for scripts."""
    from toolkit import chat as chat_lib

    if steps <= 0:
        raise UserError("--max-new-tokens: expected a positive number")
    text = prompt
    if text is None and not sys.stdin.isatty():
        text = sys.stdin.read()
        if text.endswith("\n"):
            text = text[:-1]
        if not text.strip():
            raise UserError("stdin is empty; give a prompt with --prompt TEXT or pipe some text in")
    if dtype not in ("float32", "bfloat16", "int8"):
        raise UserError(f"--dtype {dtype}: expected float32, bfloat16 or int8")
    t = chat_lib.load_target(target, tokenizer, device, numpy=True)
    if dtype != "float32":
        chat_lib.set_dtype(t, dtype)
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "repeat_penalty": repeat_penalty}
    if temperature is not None and temperature < 0:
        raise UserError(f"--temperature {temperature}: expected 0 (greedy) or more")
    sampling = chat_lib.sampling_for(t, seed=seed, **given)
    if system and not t.template:
        info("--system is ignored: a base model (no chat template in its recipe) runs in completion mode")
    session = chat_lib.Session(t, sampling, steps, system, t.template)
    if text is not None:
        chat_lib.one_shot(session, text, echo)
    else:
        if not sys.stdout.isatty():
            raise UserError("the chat REPL needs a terminal; use --prompt TEXT or pipe text in for one-shot mode")
        chat_lib.repl(session)
