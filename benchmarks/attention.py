"""Attention alone, forward and backward: torch's scaled_dot_product_attention against lmkit's matmul attention
(model.attention = "matmul"), causal, at a fixed token count per batch. Prints one JSON line per dtype and length.

    python benchmarks/attention.py --tokens 4096 --heads 6 --head-dim 48 --lengths 128,256,512,1024,2048

Each length T runs (tokens / T) sequences; `ms` is the median of --repeats calls, with the trainer's allocator
setting on CPU (freed memory kept, as a training run has it: without it every call pays page faults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.device import keep_freed_memory, resolve_device  # noqa: E402
from toolkit.models.common import matmul_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=48)
    ap.add_argument("--lengths", default="128,256,512,1024,2048")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    except (ValueError, AttributeError):
        ap.error("--lengths takes integers and --dtypes torch dtype names, comma-separated")
    if args.repeats < 1 or min(lengths) < 1 or any(args.tokens < t for t in lengths):
        ap.error("--repeats and each length must be positive, and no length above --tokens")
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()

    def timed(fn, grad):
        def call():
            fn().backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
        call()  # first call: allocations, kernel selection
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return round(1000 * sorted(times)[len(times) // 2], 2)

    for dtype in dtypes:
        for T in lengths:
            shape = (args.tokens // T, args.heads, T, args.head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(shape, device=device, dtype=dtype)
            sdpa = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), grad)
            matmul = timed(lambda q=q, k=k, v=v: matmul_attention(q, k, v, is_causal=True), grad)
            print(json.dumps({"device": str(device), "dtype": str(dtype).removeprefix("torch."), "seq": T,
                              "batch": shape[0], "heads": args.heads, "head_dim": args.head_dim,
                              "sdpa_ms": sdpa, "matmul_ms": matmul, "sdpa_over_matmul": round(sdpa / matmul, 2),
                              "torch_threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
