"""Does llama.cpp run lmkit's GGUF export the way lmkit runs the model? Prints JSON.

    pip install -e '.[interop]'     # llama-cpp-python: compiles llama.cpp (about 10 minutes on 2 cores)
    python benchmarks/interop.py out/tinystories15m --prompt "Once upon a time" -n 64

For each --dtypes (default f32, f16, q8_0) the run is exported to a temporary .gguf, llama.cpp (through
llama-cpp-python) decodes greedily from the same prompt ids (lmkit's tokenizer, with BOS) and the report says
whether its tokens equal lmkit's: `equal_to_run` (lmkit on the run's fp32 weights) and `equal_to_lmkit_gguf`
(lmkit on the GGUF's own weights, dequantized: the like-for-like check for f16/q8_0, whose rounding may change a
greedy choice). `first_difference` is the index of the first differing new token. Decode speed (tokens after the
first, over the time after the first, as run.c reports it) is given for llama.cpp and for lmkit side by side.
Exit 2, with one line on stderr, when llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a llama-family run folder with a sentencepiece tokenizer")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--n-batch", type=int, default=1, help="llama.cpp's prompt batch (n_batch). 1 (the default) feeds "
                   "the prompt a token at a time: llama-cpp-python 0.3.36 segfaulted in its batched prompt path on a "
                   "tied 288-wide q8_0 model here (f32/f16 were fine); decoding is one token at a time either way")
    p.add_argument("-n", "--new-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="f32,f16,q8_0", help="comma-separated GGUF dtypes (f32, f16, bf16, q8_0)")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp and torch threads (0 = their defaults)")
    return p.parse_args()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def lmkit_greedy(model, prompt: list[int], n: int, eos: int | None) -> tuple[list[int], float]:
    from toolkit.generate import Sampling, Stats, generate

    stats = Stats()
    tokens = generate(model, prompt, n, Sampling(temperature=0), stop_ids=(eos,) if eos is not None else (),
                      stats=stats)
    return tokens, stats.decode_tokens_per_s


def llama_cpp_greedy(llm, prompt: list[int], n: int, eos: int | None) -> tuple[list[int], float]:
    tokens, t_first = [], None
    t0 = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == eos or len(tokens) >= n:
            break
        tokens.append(int(token))
        if t_first is None:
            t_first = time.perf_counter()
    elapsed = time.perf_counter() - (t_first or t0)
    return tokens, (len(tokens) - 1) / elapsed if len(tokens) > 1 and elapsed > 0 else 0.0


def main() -> int:
    args = parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("benchmarks/interop.py needs llama-cpp-python: pip install -e '.[interop]' (it compiles llama.cpp, "
              "about 10 minutes)", file=sys.stderr)
        return 2
    import torch

    from toolkit import export as ex
    from toolkit.run import load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.run)
    tok = run.tokenizer
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(args.prompt)
    n = min(args.new_tokens, run.model.config.max_seq_len - len(prompt))
    want, run_speed = lmkit_greedy(run.model, prompt, n, tok.eos_id)
    result = {"run": str(args.run), "prompt": args.prompt, "prompt_ids": prompt, "new_tokens": n,
              "lmkit_run": {"tokens": want, "decode_tokens_per_s": run_speed, "text": tok.decode(want)},
              "gguf": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            path = ex.export_gguf(args.run, Path(tmp) / f"model_{dtype}.gguf", dtype).path
            same_weights, speed = lmkit_greedy(ex.open_gguf(path).model, prompt, n, tok.eos_id)
            llm = Llama(model_path=str(path), n_ctx=run.model.config.max_seq_len, n_threads=args.threads or None,
                        n_batch=args.n_batch, verbose=False)
            got, cpp_speed = llama_cpp_greedy(llm, prompt, n, tok.eos_id)
            result["gguf"][dtype] = {
                "bytes": path.stat().st_size, "llama_cpp_tokens": got,
                "equal_to_run": got == want, "equal_to_lmkit_gguf": got == same_weights,
                "first_difference": first_difference(got, same_weights),
                "llama_cpp_tokenizer_equal": llm.tokenize(args.prompt.encode("utf-8"), add_bos=True) == prompt,
                "llama_cpp_decode_tokens_per_s": cpp_speed, "lmkit_gguf_decode_tokens_per_s": speed,
                "llama_cpp_text": tok.decode(got),
            }
            del llm
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
