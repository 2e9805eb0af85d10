"""kill -9 during training: SIGKILL a tiny `lmkit train` at random moments, resume after each kill. Prints JSON.

    python benchmarks/faults.py                     # 20 kills, seed 0
    python benchmarks/faults.py --kills 50 --seed 3 --details

A bytes-tokenizer llama (dim 32, 2 layers, seq 32) on synthetic stories, float32 on one CPU thread, checkpoints
every --interval steps and evals every 2 intervals. Every launch but the last runs with LMKIT_SLOW_WRITES (see
toolkit/fsio.py), so each atomic write lingers between its temporary file and its rename and kills land inside
checkpoint writes too. Each kill is drawn (seeded) from four kinds:

  step     a random step of the next two intervals is logged, then a random delay of up to one interval's steps
  write    a checkpoint step is logged, then a random delay across the whole checkpoint write
           (weights .tmp, rename, state .tmp, rename)
  between  at once when state.pt.tmp appears (after a random step): the new weights are in place, the new
           state is not
  startup  the new process has claimed the folder (train.lock), then a random delay across its startup writes

After a kill the folder is checked (toolkit.run.load_state and load_run must read it) and training continues
with `lmkit train RUN --resume`; a kill before the first checkpoint (no state.pt) is followed by a fresh start
(`--force`). The launch after the last kill runs to the end, and its model.safetensors is compared bit for bit
with an uninterrupted run of the same recipe.

Figures: `resumes_ok` launches after a kill that ran without an error and made progress (a startup kill's launch
is not expected to progress); `max_steps_lost` the largest step logged before a kill minus the step the next
launch started from (state.pt's step; 0 for a fresh start): at most `save_interval` is the goal;
`corrupt_folders` kills after which the folder could not be read or resumed; `kills_in_write` kills that left a
`*.tmp` file (inside a write), `kills_between_renames` those that left state.pt.tmp beside the new weights,
`stale_locks` those that left train.lock naming the dead process (each taken over by the next launch).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = """\
name = "faults"
[model]
family = "llama"
dim = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
multiple_of = 16
max_seq_len = 32
[tokenizer]
kind = "bytes"
n_sentinels = 0
[data]
source = "synthetic"
synthetic_stories = 300
[train]
device = "cpu"
dtype = "float32"
batch_size = 4
grad_accum = 1
max_iters = {max_iters}
lr = 3e-3
warmup_iters = 2
eval_interval = {eval_interval}
eval_iters = 2
log_interval = 1
ckpt_interval = {interval}
"""

KINDS = ("step", "write", "between", "startup")
WEIGHTS_TMP = "model.next.safetensors|model.safetensors"  # where a checkpoint writes its weights


@dataclass
class Trigger:
    """When to kill a launch. `kind`: "step" (step `step` is logged; `step` counts from the launch's start),
    "write" (checkpoint step `step` is logged), "tmp" (this launch writes `name` + ".tmp", or one of the names
    "a|b", after step start + `step` if `step`), "lock" (train.lock holds this launch's pid), each followed by `delay` seconds."""

    kind: str
    step: int = 0
    name: str = ""
    delay: float = 0.0


@dataclass
class Kill:
    trigger: str
    started_from: int  # the step this launch started from (0: a fresh start)
    progress: int  # the last step logged before the kill
    tmp_left: list = field(default_factory=list)  # *.tmp files the kill left in the run folder
    lock_left: bool = False  # the kill left train.lock with the dead process's pid (the next launch takes it over)
    error: str = ""  # why the folder is not resumable after this kill, or why the launch failed
    resumed_from: int | None = None  # the step the next launch started from
    lost: int | None = None


# --- the run folder -------------------------------------------------------------------------------------------


def write_recipe(folder: Path, max_iters: int, interval: int = 3) -> Path:
    path = Path(folder) / "faults.toml"
    path.write_text(RECIPE.format(max_iters=max_iters, eval_interval=2 * interval, interval=interval))
    return path


def train_env(cache: Path, slow: float = 0.0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LMKIT_CACHE=str(cache), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", COLUMNS="400", PYTHONPATH=str(ROOT))
    env.pop("LMKIT_SLOW_WRITES", None)
    if slow:
        env["LMKIT_SLOW_WRITES"] = str(slow)
    return env


def launch(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`lmkit train ARGS` in its own process group, output to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "toolkit", "train", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)


def logged_step(run: Path) -> int:
    """The last step in metrics.jsonl (0 if none); a line being written is skipped."""
    step = 0
    try:
        text = (Path(run) / "metrics.jsonl").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        try:
            step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return step


def checkpoint_step(run: Path) -> int | None:
    """state.pt's step, None without a state.pt (raises if it cannot be read)."""
    from toolkit import run as run_lib

    path = Path(run) / run_lib.STATE
    return int(run_lib.load_state(path)["step"]) if path.is_file() else None


def check_folder(run: Path) -> str:
    """'' if the folder is readable after a kill (or has no checkpoint yet), else why not."""
    from toolkit import run as run_lib

    run = Path(run)
    if not (run / run_lib.STATE).is_file():
        return ""
    try:
        run_lib.load_state(run / run_lib.STATE)
        run_lib.load_run(run)
    except Exception as e:  # UserError or anything unexpected: both make the folder unusable
        return f"{type(e).__name__}: {e}"
    return ""


def tmp_snapshot(run: Path) -> dict[str, int]:
    """The *.tmp files in `run` and their mtimes: what earlier kills left behind."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in Path(run).rglob("*.tmp")} if Path(run).is_dir() else {}


def tmp_files(run: Path, before: dict[str, int] | None = None) -> list[str]:
    """The *.tmp files in `run` not in `before` (or rewritten since): what a kill inside a write leaves."""
    before = before or {}
    return sorted(k for k, t in tmp_snapshot(run).items() if before.get(k) != t)


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


# --- waiting and killing --------------------------------------------------------------------------------------


def wait_until(cond, proc: subprocess.Popen, timeout: float, poll: float = 0.002) -> bool:
    """True once `cond()` holds, False if `proc` ends first; TimeoutError after `timeout` s (a hang fails)."""
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        if time.monotonic() > end:
            raise TimeoutError(f"no trigger within {timeout:.0f} s")
        time.sleep(poll)


def metrics_reach(run: Path, step: int):
    path, seen = Path(run) / "metrics.jsonl", [-1]

    def cond():
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size == seen[0]:
            return False
        seen[0] = size
        return logged_step(run) >= step
    return cond


def lock_taken(run: Path, proc: subprocess.Popen):
    path = Path(run) / "train.lock"

    def cond():
        try:
            return int(path.read_text().strip() or 0) == proc.pid
        except (OSError, ValueError):
            return False
    return cond


def started(log: Path, name: str):
    """The launch has opened the run (resume: after state.pt was read and metrics.jsonl cut back to it; fresh:
    after the old files were removed): its "NAME: FAMILY with N parameters" line is in its log."""
    pattern = re.compile(rf"^{re.escape(name)}: \S+ with ", re.M)

    def cond():
        try:
            return bool(pattern.search(Path(log).read_text(errors="replace")))
        except OSError:
            return False
    return cond


def fresh_tmp(run: Path, name: str, before: dict[str, int]):
    """`name`.tmp exists in `run` and is not the one an earlier kill left there (`before`: tmp_snapshot)."""
    path, old = Path(run) / (name + ".tmp"), before.get(name + ".tmp")

    def cond():
        try:
            return path.stat().st_mtime_ns != old
        except OSError:
            return False
    return cond


def kill_when(trigger: Trigger, proc: subprocess.Popen, run: Path, log: Path, start: int, before: dict[str, int],
              timeout: float, name: str = "faults") -> bool:
    """Wait for `trigger`, then SIGKILL the launch's process group. False if the launch ended before it."""
    if trigger.kind in ("step", "write"):
        ready, reach = started(log, name), metrics_reach(run, start + trigger.step if trigger.kind == "step"
                                                          else trigger.step)
        ok = wait_until(ready, proc, timeout) and wait_until(reach, proc, timeout)
    elif trigger.kind == "tmp":
        ok = (not trigger.step or (wait_until(started(log, name), proc, timeout)
                                   and wait_until(metrics_reach(run, start + trigger.step), proc, timeout)))
        tmps = [fresh_tmp(run, n, before) for n in trigger.name.split("|")]
        ok = ok and wait_until(lambda: any(c() for c in tmps), proc, timeout)
    elif trigger.kind == "lock":
        ok = wait_until(lock_taken(run, proc), proc, timeout)
    else:
        raise ValueError(trigger.kind)
    if not ok:
        return False
    if trigger.delay:
        time.sleep(trigger.delay)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def random_trigger(rng: random.Random, start: int, interval: int, slow: float, step_s: float) -> Trigger:
    """One kill of a random kind (see the module docstring), at a random offset."""
    kind = rng.choice(KINDS)
    if kind == "step":
        return Trigger("step", step=rng.randint(1, 2 * interval), delay=rng.uniform(0, interval * step_s))
    if kind == "write":
        first = (start // interval + 1) * interval
        return Trigger("write", step=first + interval * rng.randint(0, 1), delay=rng.uniform(0, 2 * slow + 0.02))
    if kind == "between":
        return Trigger("tmp", name="state.pt", step=rng.randint(0, interval))
    return Trigger("lock", delay=rng.uniform(0, 6 * slow))


def describe(t: Trigger) -> str:
    what = {"step": f"step +{t.step}", "write": f"ckpt step {t.step}",
            "tmp": f"{t.name}.tmp" + (f" after step +{t.step}" if t.step else ""),
            "lock": "train.lock"}[t.kind]
    return what + (f" +{t.delay * 1000:.0f} ms" if t.delay else "")


# --- the experiment -------------------------------------------------------------------------------------------


def reference_run(work: Path, recipe: Path, cache: Path, timeout: float = 300) -> Path:
    """The uninterrupted run of `recipe` (it also prepares the data the faulted run reads from the cache)."""
    out = Path(work) / "reference"
    proc = launch([str(recipe), "--out", str(out)], train_env(cache), Path(work) / "reference.log")
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if rc:
        raise RuntimeError(f"the reference run failed (rc {rc}):\n{(Path(work) / 'reference.log').read_text()[-3000:]}")
    return out


def faulted_run(work: Path, recipe: Path, cache: Path, triggers, kills: int, interval: int, max_iters: int,
                slow: float, timeout: float = 120) -> dict:
    """Train `recipe` into work/run, killing it `kills` times at `triggers(i, start)`'s moments and resuming after
    each; the launch after the last kill runs to the end. Returns the figures (without bitwise_equal)."""
    from toolkit import run as run_lib

    run = Path(work) / "run"
    log_dir = Path(work) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    done: list[Kill] = []
    resumes_ok, launches_after_kill, restarts, failures = 0, 0, 0, []
    fresh, start = True, 0
    final_rc, final_step = None, None
    for i in range(2 * kills + 2):  # a launch that fails is followed by a fresh start, which may be killed too
        last = len(done) == kills
        if fresh:
            args = [str(recipe), "--out", str(run)] + (["--force"] if i else [])
        else:
            args = [str(run), "--resume"]
        log = log_dir / f"launch{i:03d}.log"
        before = tmp_snapshot(run)
        proc = launch(args, train_env(cache, 0.0 if last else slow), log)
        if i:
            launches_after_kill += 1
        if last:
            try:
                final_rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                final_rc = "timeout"
            final_step = logged_step(run)
            resumed = _resumed_from(log)
            ok = final_rc == 0 and final_step == max_iters and (fresh or resumed == start)
            if i and ok:
                resumes_ok += 1
            if not ok:
                failures.append(f"launch {i} ({' '.join(args[1:])}): rc {final_rc}, last step {final_step}, "
                                f"started from {resumed} (expected {start}): {log.read_text()[-600:]!r}")
                if done and not done[-1].error:
                    done[-1].error = f"the final launch failed (rc {final_rc})"
            break
        trigger = triggers(len(done), start)
        try:
            killed = kill_when(trigger, proc, run, log, start, before, timeout)
        except TimeoutError as e:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed, failures = True, failures + [f"launch {i}: {e} ({describe(trigger)}): hung"]
        if not killed:  # ended before the trigger: an error, or the run finished early
            rc = proc.returncode
            if rc == 0 and logged_step(run) >= max_iters:
                failures.append(f"launch {i} finished before kill {len(done) + 1}; raise max_iters")
                final_rc, final_step = 0, logged_step(run)
                resumes_ok += bool(i)
                break
            failures.append(f"launch {i} ({' '.join(args[1:])}) failed before its kill (rc {rc}): "
                            f"{log.read_text()[-600:]!r}")
            if done:  # the folder the last kill left could not be resumed: start over, as a user would have to
                k = done[-1]
                k.error = k.error or f"the next launch failed (rc {rc})"
                k.resumed_from, k.lost = 0, k.progress
            fresh, start = True, 0
            continue
        if i:
            resumed = _resumed_from(log)
            progressed = logged_step(run) > start or trigger.kind == "lock"
            if (fresh or resumed == start or trigger.kind == "lock") and progressed:
                resumes_ok += 1
            else:
                failures.append(f"launch {i}: started from {resumed} (state.pt had {start}), progressed: {progressed}")
        k = Kill(trigger=describe(trigger), started_from=start, progress=max(start, logged_step(run)),
                 tmp_left=tmp_files(run, before), lock_left=lock_taken(run, proc)())
        k.error = check_folder(run)
        done.append(k)
        if k.error:
            failures.append(f"kill {len(done)} ({k.trigger}): {k.error}")
        try:
            ckpt = checkpoint_step(run) if not k.error else None
        except Exception as e:  # noqa: BLE001 - reported as a corrupt folder
            k.error, ckpt = f"{type(e).__name__}: {e}", None
        if ckpt is None:  # no checkpoint yet (or none readable): start over
            fresh, start = True, 0
            restarts += 1
        else:
            fresh, start = False, ckpt
        k.resumed_from, k.lost = start, k.progress - start
    lost = [k.lost for k in done if k.lost is not None]
    return {
        "kills": len(done), "resumes_ok": resumes_ok, "resumes": launches_after_kill,
        "max_steps_lost": max(lost, default=0), "save_interval": interval,
        "corrupt_folders": sum(bool(k.error) for k in done), "restarts": restarts,
        "kills_in_write": sum(bool(k.tmp_left) for k in done),
        "kills_between_renames": sum(any(t == run_lib.STATE + ".tmp" for t in k.tmp_left) for k in done),
        "stale_locks": sum(k.lock_left for k in done),
        "final_rc": final_rc, "final_step": final_step, "max_iters": max_iters,
        "failures": failures, "details": [vars(k) for k in done], "run": str(run),
    }


def _resumed_from(log: Path) -> int | None:
    m = re.search(r"resuming \S+ at step (\d+)", log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def experiment(work: Path, kills: int = 20, seed: int = 0, interval: int = 3, slow: float = 0.1,
               triggers=None, max_iters: int = 0, timeout: float = 120) -> dict:
    """The whole benchmark in `work`: reference run, faulted run, comparison. `triggers(i, start) -> Trigger`
    (default: random, seeded)."""
    t0 = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    max_iters = max_iters or (kills + 2) * 3 * interval
    recipe = write_recipe(work, max_iters, interval)
    reference = reference_run(work, recipe, cache)
    step_s = _step_seconds(reference)
    if triggers is None:
        rng = random.Random(seed)

        def triggers(i, start):
            return random_trigger(rng, start, interval, slow, step_s)
    report = faulted_run(work, recipe, cache, triggers, kills, interval, max_iters, slow, timeout)
    weights = work / "run" / "model.safetensors"
    report["bitwise_equal"] = (report["final_rc"] == 0 and weights.is_file()
                               and same_weights(reference / "model.safetensors", weights))
    report.update(seed=seed, slow_writes_s=slow, step_ms=round(step_s * 1000, 2),
                  wall_s=round(time.perf_counter() - t0, 1))
    return report


def _step_seconds(run: Path) -> float:
    """A step's time in the reference run (median of the logged windows), for the random offsets."""
    rates = sorted(m["tokens_per_s"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if m.get("tokens_per_s"))
    info = json.loads((run / "run.json").read_text())
    return info["tokens_per_step"] / rates[len(rates) // 2] if rates else 0.01


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=int, default=3, help="train.ckpt_interval (evals every 2 intervals)")
    ap.add_argument("--slow-writes", type=float, default=0.1, help="LMKIT_SLOW_WRITES for the killed launches (s)")
    ap.add_argument("--max-iters", type=int, default=0, help="0 = enough for every kill: (kills + 2) x 3 intervals")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs and logs here (default: a temp dir)")
    ap.add_argument("--details", action="store_true", help="also print each kill")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmkit-faults-") as tmp:
        report = experiment(args.workdir or Path(tmp), args.kills, args.seed, args.interval, args.slow_writes,
                            max_iters=args.max_iters)
    if not args.details:
        report.pop("details")
    report.pop("run")
    print(json.dumps(report, indent=2))
    ok = (report["resumes_ok"] == report["resumes"] and report["max_steps_lost"] <= args.interval
          and not report["corrupt_folders"] and report["bitwise_equal"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
