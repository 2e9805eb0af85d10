"""benchmarks/attractor_seed.py with a stand-in for the seed's sandbox.py (its logic, imported): the seed's epoch
summary is read as the seed prints it, the runs alternate, the ratio is of the medians, and the user's checkout of
the seed is left as it was although sandbox.py writes beside itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# prints sandbox.py's --debug epoch summary (its format, with its "≈"), after what the seed does beside itself:
# a checkpoint and logs/ under its folder; imports the tokenizer the way sandbox.py does
FAKE_SANDBOX = '''import sys
from pathlib import Path

from attractor_llm.tokenizer import AttractorTokenizer

here = Path(__file__).resolve().parent
args = sys.argv[1:]
steps = int(args[args.index("--num-dynamics-steps") + 1])
assert Path(args[args.index("--corpus") + 1]).read_text(encoding="utf-8")
(here / "checkpoints").mkdir(exist_ok=True)
(here / "checkpoints" / "ckpt_step0000010.pt").write_bytes(b"new")
(here / "logs").mkdir(exist_ok=True)
(here / "logs" / "eval_epoch_1.txt").write_text("new")
print(f"[debug] epoch 1 summary: batches=10  window_updates\\u224812000  throughput={64 / steps:.2f} batch/s")
'''


def load_benchmark():
    spec = importlib.util.spec_from_file_location("lmkit_benchmark_attractor_seed",
                                                  ROOT / "benchmarks" / "attractor_seed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_seed_benchmark_alternates_reads_the_seed_and_leaves_its_checkout_alone(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    seed = tmp_path / "seed"
    (seed / "checkpoints").mkdir(parents=True)
    (seed / "sandbox.py").write_text(FAKE_SANDBOX, encoding="utf-8")
    (seed / "checkpoints" / "ckpt_step0000010.pt").write_bytes(b"the user's own")
    corpus = tmp_path / "stories.txt"
    corpus.write_text("Once upon a time there was a cat.\n" * 100, encoding="utf-8")
    lmkit_speed = {16: [500.0, 300.0], 32: [200.0, 220.0]}  # windows/s per lmkit run, in order

    def fake_lmkit(steps, env):
        return {"side": "lmkit", "steps": steps, "windows_per_s": lmkit_speed[steps].pop(0)}

    monkeypatch.setattr(bench, "run_lmkit", fake_lmkit)
    monkeypatch.setattr(sys, "argv", ["attractor_seed.py", str(seed), "--corpus", str(corpus), "--steps", "16,32",
                                      "--repeats", "2"])
    bench.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs, summaries = lines[:8], lines[8:]
    assert [(r["side"], r["steps"]) for r in runs] == [(side, steps) for steps in (16, 32) for _ in range(2)
                                                       for side in ("seed", "lmkit")]
    # the seed's throughput is 64 / steps batches/s here: 4.0 at 16 steps (256 windows/s), 2.0 at 32 (128)
    assert [r["windows_per_s"] for r in runs if r["side"] == "seed"] == [256.0, 256.0, 128.0, 128.0]
    assert summaries == [
        {"steps": 16, "seed_windows_per_s": 256.0, "lmkit_windows_per_s": 400.0, "ratio": 1.56, "repeats": 2},
        {"steps": 32, "seed_windows_per_s": 128.0, "lmkit_windows_per_s": 210.0, "ratio": 1.64, "repeats": 2},
    ]
    # sandbox.py ran from a copy: the user's checkpoint is theirs still, and no logs/ appeared
    assert (seed / "checkpoints" / "ckpt_step0000010.pt").read_bytes() == b"the user's own"
    assert not (seed / "logs").exists()


def test_the_seed_benchmark_says_in_one_line_what_is_missing(tmp_path, monkeypatch):
    bench = load_benchmark()
    corpus = tmp_path / "stories.txt"
    corpus.write_text("text", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["attractor_seed.py", str(tmp_path / "nothing"), "--corpus", str(corpus)])
    with pytest.raises(SystemExit, match="no sandbox.py in .*nothing"):
        bench.main()
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "sandbox.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(sys, "argv", ["attractor_seed.py", str(tmp_path / "seed"), "--corpus", str(corpus),
                                      "--steps", "16", "--repeats", "1"])
    with pytest.raises(SystemExit, match=r"the seed's sandbox.py failed \(exit 3\)"):
        bench.main()
