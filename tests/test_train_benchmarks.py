"""benchmarks/llama2c_train.py (llama2.c's train.py step, from the user's checkout) and benchmarks/attention.py:
they run what they say and print JSON, and a wrong argument is one line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for llama2.c's model.py with its interface: ModelArgs, Transformer(args), forward(x, y) setting
# last_loss, configure_optimizers(weight_decay, lr, betas, device_type). It records what train.py's step did.
STAND_IN = r'''
from dataclasses import dataclass
from pathlib import Path
import torch, torch.nn.functional as F
LOG = Path(__file__).with_name("calls.log")

def record(what):
    with LOG.open("a") as f:
        f.write(what + "\n")

@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 6
    vocab_size: int = 32000
    multiple_of: int = 256
    max_seq_len: int = 2048
    dropout: float = 0.0

class Transformer(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.emb = torch.nn.Embedding(args.vocab_size, 8)
        self.out = torch.nn.Linear(8, args.vocab_size)
        self.args = args

    def forward(self, x, y):
        logits = self.out(self.emb(x))
        self.last_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        record(f"forward {tuple(x.shape)}")
        return logits

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print("num decayed parameter tensors: 2")
        opt = torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
        step = opt.step
        def counted(*a, **k):
            record("step")
            return step(*a, **k)
        opt.step = counted
        return opt
'''


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_llama2c_train_runs_train_pys_step_from_the_checkout(tmp_path):
    (tmp_path / "llama2.c").mkdir()
    (tmp_path / "llama2.c" / "model.py").write_text(STAND_IN)
    proc = run("benchmarks/llama2c_train.py", str(tmp_path / "llama2.c"), "--batch", "2", "--seq", "8",
               "--vocab", "16", "--warmup", "1", "--steps", "2", "--repeats", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # the model's own prints do not mix into the JSON
    out = json.loads(lines[0])
    assert (out["anchor"], out["batch"], out["seq"], out["compile"]) == ("llama2.c train.py", 2, 8, False)
    assert out["tokens_per_s"] > 0 and 0 < out["best_ms_per_step"] <= out["ms_per_step"]
    calls = (tmp_path / "llama2.c" / "calls.log").read_text().splitlines()
    assert calls == ["forward (2, 8)", "step"] * (1 + 2 * 3)  # warm-up and 3 blocks of 2: forward, then a step

    missing = run("benchmarks/llama2c_train.py", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "has no model.py: give a checkout of karpathy/llama2.c" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_attention_benchmark_times_both_kernels_per_length():
    proc = run("benchmarks/attention.py", "--tokens", "32", "--heads", "2", "--head-dim", "4", "--lengths", "8,16",
               "--dtypes", "float32", "--repeats", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["seq"], r["batch"], r["dtype"]) for r in rows] == [(8, 4, "float32"), (16, 2, "float32")]
    assert all(r["sdpa_ms"] > 0 and r["matmul_ms"] > 0 for r in rows)
    assert all(r["sdpa_over_matmul"] == round(r["sdpa_ms"] / r["matmul_ms"], 2) for r in rows)
    bad = run("benchmarks/attention.py", "--lengths", "64", "--tokens", "32")
    assert bad.returncode == 2 and "no length above --tokens" in bad.stderr and "Traceback" not in bad.stderr
