"""Training throughput of llama2.c's own train.py step, the anchor for train_throughput.py. Prints JSON.

    python benchmarks/llama2c_train.py path/to/llama2.c --batch 16 --seq 256 --vocab 4096 --compile

Imports model.py from your llama2.c checkout (git clone https://github.com/karpathy/llama2.c; nothing of it is
in lmkit) and runs train.py's step as train.py runs it on a CPU: fp32 (train.py's autocast context is off on
CPU), its configure_optimizers AdamW (lr 5e-4, weight decay 0.1, betas 0.9/0.95), clipping at 1.0, optionally
torch.compile; the stories15M shape by default (288/6/6, multiple_of 32), random tokens, no data needed.
--repeats R blocks of --steps steps: `tokens_per_s` is the median block, as train_throughput.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama2c", type=Path, help="a checkout of karpathy/llama2.c (its model.py is imported)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=288)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (args.llama2c / "model.py").is_file():
        ap.error(f"{args.llama2c} has no model.py: give a checkout of karpathy/llama2.c")
    if min(args.steps, args.repeats, args.batch, args.seq) < 1:
        ap.error("--steps, --repeats, --batch and --seq must be positive")

    sys.path.insert(0, str(args.llama2c.resolve()))
    from model import ModelArgs, Transformer  # llama2.c's

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                  vocab_size=args.vocab, multiple_of=32, max_seq_len=args.seq, dropout=0.0))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        optimizer = model.configure_optimizers(0.1, 5e-4, (0.9, 0.95), "cpu")
    step_model = torch.compile(model) if args.compile else model
    batches = [(torch.randint(0, args.vocab, (args.batch, args.seq)), torch.randint(0, args.vocab, (args.batch, args.seq)))
               for _ in range(args.warmup + args.steps * args.repeats)]

    def step(x, y):  # train.py's inner loop at gradient_accumulation_steps = 1
        step_model(x, y)
        model.last_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for x, y in batches[: args.warmup]:
        step(x, y)
    warmup_s = time.perf_counter() - t0
    walls = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        for x, y in batches[args.warmup + rep * args.steps: args.warmup + (rep + 1) * args.steps]:
            step(x, y)
        walls.append((time.perf_counter() - t0) / args.steps)
    dt = sorted(walls)[len(walls) // 2]
    print(json.dumps({"anchor": "llama2.c train.py", "dtype": "float32", "compile": args.compile,
                      "batch": args.batch, "seq": args.seq, "vocab": args.vocab,
                      "tokens_per_s": round(args.batch * args.seq / dt, 1), "ms_per_step": round(1000 * dt, 1),
                      "best_ms_per_step": round(1000 * min(walls), 1), "warmup_s": round(warmup_s, 1),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
