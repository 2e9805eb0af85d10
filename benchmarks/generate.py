"""Generation speed (tokens/s) for a llama model shape with random weights; prints JSON.

    python benchmarks/generate.py                       # tinystories15m shape: 288/6/6, vocab 32000, seq 256
    python benchmarks/generate.py --decoder torch       # the plain PyTorch KV-cache forward, for comparison
    python benchmarks/generate.py --runc path/to/run    # also time a compiled llama2.c run.c on the same weights

Greedy, batch 1, prompt = BOS, stop tokens ignored so every run makes the same number of tokens.
`decode_tokens_per_s` is measured as run.c measures "achieved tok/s" (tokens after the first, over the
time after the first). --threads 0 (the default) leaves torch and numpy's BLAS at their defaults (all
cores), as `lmkit chat` runs; --threads 1 compares like for like with run.c single-threaded.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--runc", "--run-c", dest="run_c", default="",
                   help="path to a run.c binary you built from llama2.c (gcc -Ofast -o run run.c -lm)")
    return p.parse_args()


def main():
    args = parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
            os.environ[var] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from toolkit import generate as G
    from toolkit.models.llama import Config, Model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                    vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    model = Model(config).to(args.device).eval()
    make = {"auto": G.decoder_for, "torch": G.CachedDecoder, "window": G.WindowDecoder}[args.decoder]
    n_new = min(args.new_tokens, args.seq_len - 1)
    runs, dec = [], None
    for _ in range(args.repeats):
        dec = make(model)
        stats = G.Stats()
        out = G.generate(dec, [1], n_new, G.Sampling(temperature=0.0), stop_ids=(), stats=stats)
        assert len(out) == n_new
        runs.append({"tokens_per_s": round(stats.tokens_per_s, 1),
                     "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1)})
    best = max(runs, key=lambda r: r["decode_tokens_per_s"])
    result = {
        "shape": {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                  "n_kv_heads": config.kv_heads, "hidden_dim": config.ffn_dim, "vocab_size": args.vocab_size,
                  "seq_len": args.seq_len},
        "params": model.num_params(),
        "new_tokens": n_new,
        "decoder": type(dec).__name__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **best,
        "runs": runs,
    }
    if args.run_c:
        result["run_c"] = time_run_c(args.run_c, model, args.repeats, args.new_tokens)
    print(json.dumps(result, indent=2))


def time_run_c(binary: str, model, repeats: int, steps: int) -> dict:
    """run.c's own "achieved tok/s" on the same weights (exported v0) and a dummy 0..V tokenizer.bin."""
    from toolkit.export import llama2c
    from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin

    V = model.config.vocab_size
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [(f"t{i}", -float(i)) for i in range(V - len(pieces))]
    with tempfile.TemporaryDirectory() as tmp:
        bin_path, tok_path = Path(tmp) / "model.bin", Path(tmp) / "tokenizer.bin"
        llama2c.export_model(model.cpu(), bin_path, 0)
        write_tokenizer_bin(tok_path, pieces[:V], 1, 2)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = subprocess.run([binary, str(bin_path), "-z", str(tok_path), "-t", "0", "-n", str(steps)],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            m = re.search(r"achieved tok/s: ([0-9.]+)", r.stderr)
            rates.append({"decode_tokens_per_s": float(m.group(1)) if m else None,
                          "tokens": max(len(r.stdout.split()) - 0, 0), "wall_s": round(time.perf_counter() - t0, 3)})
    best = max((r["decode_tokens_per_s"] or 0) for r in rates)
    return {"binary": binary, "decode_tokens_per_s": round(best, 1),
            "median": round(statistics.median([(r["decode_tokens_per_s"] or 0) for r in rates]), 1), "runs": rates}


if __name__ == "__main__":
    main()
