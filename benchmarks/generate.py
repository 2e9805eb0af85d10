"""Generation speed (tokens/s) for a llama model shape with random weights; prints JSON.

    python benchmarks/generate.py                       # tinystories15m shape: 288/6/6, vocab 32000, seq 256
    python benchmarks/generate.py --decoder torch       # the plain PyTorch KV-cache forward, for comparison
    python benchmarks/generate.py --runc path/to/run    # also time a compiled llama2.c run.c on the same weights
    python benchmarks/generate.py --dtype bfloat16      # the C decode step on bfloat16 copies of the matrices
    python benchmarks/generate.py --dtype int8          # ... on int8 copies, one scale per row
    LMKIT_DECODE_STEP=numpy python benchmarks/generate.py   # the numpy step instead of the C one

Greedy, batch 1, prompt = BOS, stop tokens ignored so every run makes the same number of tokens.
`decode_tokens_per_s` is measured as run.c measures "achieved tok/s" (tokens after the first, over the
time after the first). --threads 0 (the default) leaves torch and numpy's BLAS at their defaults (all
cores), as `lmkit chat` runs; --threads 1 compares like for like with run.c single-threaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=288)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--n-kv-heads", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="0 = library defaults (as lmkit chat)")
    p.add_argument("--repeats", type=int, default=3, help="runs; the best is reported (others are in 'runs')")
    p.add_argument("--decoder", choices=("auto", "torch", "window"), default="auto",
                   help="auto = what lmkit chat uses; torch = the model's KV-cache forward; window = no cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8", "float16"),
                   help="the weights' precision: with --decoder auto, bfloat16 and int8 are the C decode step's (as "
                   "`lmkit chat --dtype`), float16 the torch model's; the greedy ids are compared with float32's")
    p.add_argument("--runc", "--run-c", dest="run_c", default="",
                   help="path to a run.c binary you built from llama2.c (gcc -Ofast -o run run.c -lm, or with "
                   "-fopenmp for threads)")
    p.add_argument("--runc-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for run.c (default: --threads, or 1 when that is 0)")
    p.add_argument("--startup", action="store_true",
                   help="also time `lmkit chat --prompt ... -n 1` on the .bin and on a run folder (and run.c -n 1) "
                   "as processes: the time a user waits for a one-token reply, interpreter and imports included")
    return p.parse_args()


def main():
    args = parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
            os.environ[var] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from toolkit import generate as G
    from toolkit.models import llama_cpu
    from toolkit.models.common import CachedDecoder
    from toolkit.models.llama import Config, Model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                    vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    fp32_model = model = Model(config).to(args.device).eval()
    make = {"auto": G.decoder_for, "torch": CachedDecoder, "window": G.WindowDecoder}[args.decoder]
    n_new = min(args.new_tokens, args.seq_len - 1)
    reference = None
    if args.dtype != "float32":  # the float32 greedy ids first, to measure what the lower precision changes
        reference = G.generate(G.decoder_for(fp32_model), [1], n_new, G.Sampling(temperature=0.0), stop_ids=())
        if args.decoder == "auto" and args.dtype in ("bfloat16", "int8") and llama_cpu.c_library() is not None:
            weights = llama_cpu.decode_weights(fp32_model)
            make = lambda _: llama_cpu.cpu_decoder(weights, args.dtype)  # noqa: E731
        elif args.dtype == "int8":
            raise SystemExit("--dtype int8 is the C decode step's: --decoder auto, with lmkit installed by make install")
        else:
            model = copy.deepcopy(fp32_model).to(getattr(torch, args.dtype))
    runs, dec, out = [], None, []
    for _ in range(args.repeats):
        dec = make(model)
        stats = G.Stats()
        out = G.generate(dec, [1], n_new, G.Sampling(temperature=0.0), stop_ids=(), stats=stats)
        assert len(out) == n_new
        runs.append({"tokens_per_s": round(stats.tokens_per_s, 1),
                     "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1)})
    best = max(runs, key=lambda r: r["decode_tokens_per_s"])
    if reference is not None:
        diff = next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b), None)
        best["float32_agreement"] = {"first_different_token": diff,
                                     "same_tokens": sum(a == b for a, b in zip(out, reference)), "of": len(out)}
    result = {
        "shape": {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                  "n_kv_heads": config.kv_heads, "hidden_dim": config.ffn_dim, "vocab_size": args.vocab_size,
                  "seq_len": args.seq_len},
        "params": model.num_params(),
        "new_tokens": n_new,
        "decoder": type(dec).__name__,
        "decode_step": getattr(dec, "backend", "torch"),  # a llama on the CPU: the C step, or numpy's
        "decode_step_threads": getattr(dec, "threads", None),  # the C step's OpenMP threads
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **best,
        "runs": runs,
    }
    if args.run_c or args.startup:
        with tempfile.TemporaryDirectory() as tmp:
            bin_path, tok_path = export_for_run_c(fp32_model, Path(tmp))  # run.c runs the float32 weights
            if args.run_c:
                threads = args.runc_threads or args.threads or 1
                rc = time_run_c(args.run_c, bin_path, tok_path, args.repeats, n_new, threads)
                theirs = rc.pop("token_ids")  # run.c stops early if it samples BOS: compare what both made
                ours = reference if reference is not None else out  # the float32 ids, as run.c's weights
                first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
                rc["greedy_identical"] = first_diff is None if theirs else None  # None: run.c sampled BOS first
                rc["first_different_token"] = first_diff
                rc["compared_tokens"] = min(len(ours), len(theirs))
                result["run_c"] = rc
            if args.startup:
                result["startup"] = time_startup(bin_path, tok_path, args.repeats, args.run_c, args.threads)
    print(json.dumps(result, indent=2))


def export_for_run_c(model, folder: Path) -> tuple[Path, Path]:
    """The model as a llama2.c v0 .bin and a tokenizer.bin whose piece i (past the three specials) is " i", so
    that run.c's printed text gives back the token ids."""
    from toolkit.export import llama2c
    from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin

    V = model.config.vocab_size
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f" {i}", -float(i)) for i in range(3, V)]
    bin_path, tok_path = folder / "model.bin", folder / "tokenizer.bin"
    llama2c.export_model(model.cpu(), bin_path, 0)
    write_tokenizer_bin(tok_path, pieces[:V], 1, 2)
    return bin_path, tok_path


def time_run_c(binary: str, bin_path: Path, tok_path: Path, repeats: int, steps: int, threads: int) -> dict:
    """run.c's own "achieved tok/s" (greedy, prompt = BOS) and the ids it generated. run.c's -n counts the BOS."""
    rates, ids = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([binary, str(bin_path), "-z", str(tok_path), "-t", "0", "-n", str(steps + 1)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        m = re.search(r"achieved tok/s: ([0-9.]+)", r.stderr)
        ids = [int(t) for t in r.stdout.split()]
        rates.append({"decode_tokens_per_s": float(m.group(1)) if m else None, "tokens": len(ids),
                      "wall_s": round(time.perf_counter() - t0, 3)})
    best = max((r["decode_tokens_per_s"] or 0) for r in rates)
    return {"binary": binary, "threads": threads, "decode_tokens_per_s": round(best, 1),
            "median": round(statistics.median([(r["decode_tokens_per_s"] or 0) for r in rates]), 1), "runs": rates,
            "token_ids": ids}


def time_startup(bin_path: Path, tok_path: Path, repeats: int, run_c: str, threads: int) -> dict:
    """Wall time of a one-token greedy reply as a fresh process: `lmkit chat` on the .bin and on a run folder
    imported from it, and, if given, run.c; alternated, a round of each per repeat, after one round not counted
    (it writes lmkit's .pyc files, as a pip install has, and warms the page cache)."""
    from toolkit.export import import_bin

    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # without .pyc files every start compiles lmkit's modules again
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    run_path = import_bin(bin_path, tok_path, bin_path.parent / "run")
    chat = [sys.executable, "-m", "toolkit", "chat"]
    reply = ["--prompt", " 5", "-n", "1", "-t", "0"]
    commands = {"lmkit_chat_bin": chat + [str(bin_path), "-z", str(tok_path)] + reply,
                "lmkit_chat_run": chat + [str(run_path)] + reply}
    if run_c:
        commands["run_c"] = [run_c, str(bin_path), "-z", str(tok_path), "-t", "0", "-n", "2"]
    walls = {name: [] for name in commands}
    for round_ in range(repeats + 1):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
            if round_:
                walls[name].append(round(time.perf_counter() - t0, 3))
    return {name: {"median_s": statistics.median(w), "runs_s": w} for name, w in walls.items()}


if __name__ == "__main__":
    main()
