"""Denoise val windows with a trained T5 run and print JSON: samples and how much of the masked text it recovers.

    python benchmarks/t5_denoise.py out/t5_ascii_cpu [--windows 32] [--samples 3] [--temperature 0]

Each val window is corrupted with the run's fixed eval corruption (mask rate 0.15, mean span 3); the model
generates the target (sentinel, tokens, ..., EOS) through the one generation loop with the encoder cached.
Reported: masked-token accuracy (position by position within each span), exact spans, how often it stopped with
EOS, decode tokens/s, and a few samples (original / corrupted / filled).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from toolkit import run as run_lib
from toolkit.generate import Sampling, Stats, generate
from toolkit.shards.format import ShardSet
from toolkit.shards.sampler import eval_windows
from toolkit.shards.span_corruption import eval_batch, reconstruct, special_ids, target_spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run = run_lib.load_run(args.run)
    model, tok, c = run.model, run.tokenizer, run.model.config
    ids = special_ids(c)
    shards = ShardSet(run.info["data"]["shards"])
    x = np.concatenate([w for w, _ in eval_windows(shards, "val", c.max_seq_len, args.windows, 1)])[: args.windows]
    enc, tgt = eval_batch(model.config, x, 0)

    def show(row) -> str:
        if tok.kind != "bytes":
            return tok.decode(row)
        parts, text = [], []
        for t in row:
            if ids.sentinel_start <= t < ids.sentinel_start + ids.n_sentinels:
                parts.append(tok.decode(text) + f"<s{t - ids.sentinel_start}>")
                text = []
            elif t not in (ids.pad, ids.eos, ids.bos):
                text.append(t)
        return "".join(parts) + tok.decode(text)

    right = total = exact = n_spans = stopped = new_tokens = 0
    seconds = 0.0
    samples = []
    for i in range(len(x)):
        row_enc = enc[i][enc[i] != ids.pad]
        truth = [int(t) for t in tgt[i] if t >= 0]
        stats = Stats()
        out = generate(model.condition(torch.from_numpy(row_enc)[None]), [ids.bos], c.target_len - 1,
                       Sampling(temperature=args.temperature, seed=i), stop_ids=(ids.eos,), stats=stats)
        stopped += stats.stop == "stop"
        new_tokens += stats.new_tokens
        seconds += stats.seconds
        want, got = target_spans(truth, ids), target_spans(out, ids)
        for s, tokens in want.items():
            guess = got.get(s, [])
            right += sum(a == b for a, b in zip(tokens, guess))
            total += len(tokens)
            exact += guess == tokens
            n_spans += 1
        if len(samples) < args.samples:
            filled = reconstruct(row_enc[None], np.array([out + [ids.eos]]), ids)[0]
            samples.append({"original": tok.decode(x[i].tolist()), "corrupted": show(row_enc.tolist()),
                            "target": show(truth), "generated": show(out), "filled": tok.decode(filled)})
    print(json.dumps({
        "run": args.run, "step": run.step, "windows": len(x), "masked_tokens": total,
        "masked_token_accuracy": right / max(total, 1), "exact_spans": exact / max(n_spans, 1),
        "stopped_with_eos": stopped / len(x), "decode_tokens_per_s": new_tokens / seconds if seconds else 0.0,
        "samples": samples, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
