"""The one training loop, used by every model family.

Single process, or DDP or FSDP2 (train.parallel) under torchrun (nccl on GPU, gloo on CPU). Every rank draws
the same global stream of micro-batches and keeps its own share, so a DDP run's global batch equals a single
process's. Checkpoints are atomic; `resume` continues bit for bit (on CPU) where a run stopped.

`train` reads as four parts: `setup` (data, model, optimizer, sampler, resume state), `fit` (the steps),
`validate` (an eval on the fixed val windows) and `save` (weights and training state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from toolkit import models, tokenizers
from toolkit import recipe as recipe_lib
from toolkit import run as run_lib
from toolkit.console import console, info
from toolkit.device import autocast, keep_freed_memory, peak_flops, resolve_dtype
from toolkit.errors import UserError
from toolkit.evaluate import evaluate
from toolkit.shards.format import ShardSet
from toolkit.shards.sampler import split_windows
from toolkit.train import distributed
from toolkit.train.distributed import Dist, any_across, barrier, end_distributed, init_distributed, mean_across
from toolkit.train.metrics import SAMPLES, append_samples, eval_samples, truncate_after
from toolkit.train.optim import build_optimizers, lr_factor, set_lr


class StopFlag:
    """First Ctrl-C: finish the current step, save, exit. A second one interrupts at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        console.print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", style="yellow")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train_step(model, raw_model, optimizers, batches, amp, grad_clip: float, scaler=None, no_sync=None,
               row_losses: list | None = None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the mean loss as a tensor (no host sync).
    `no_sync` (DDP) skips the gradient all-reduce on all but the last micro-batch. With `row_losses` (a list),
    each micro-batch's per-row losses are appended to it (an objective's feedback, e.g. the T5 curriculum)."""
    step_loss = None
    for i, (x, y) in enumerate(batches):
        with no_sync() if no_sync is not None and i < len(batches) - 1 else nullcontext():
            with amp:
                logits, loss = model(x, y)
            if row_losses is not None:
                row_losses.append(raw_model.row_losses(logits.detach(), y))
            loss = loss / len(batches)
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    if scaler:
        for opt in optimizers:
            scaler.unscale_(opt)
    if grad_clip:
        clip_gradients(raw_model, optimizers, grad_clip)
    for opt in optimizers:
        scaler.step(opt) if scaler else opt.step()
        opt.__dict__.pop("grad_scale", None)  # clip_gradients' factor is for this step only
    if scaler:
        scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return step_loss


def clip_gradients(model, optimizers, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_: gradients scaled so that their total norm is at most `max_norm`. Fused
    optimizers take the factor as their `grad_scale`, the attribute through which torch's GradScaler hands
    them a scale, instead of a pass that rewrites every gradient (about 2 ms of the attractor A1 recipe's step
    on CPU); train_step removes it after the step. Returns the total norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params or not all(opt.defaults.get("fused") for opt in optimizers):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    scale = ((norm + 1e-6) / max_norm).clamp_min(1.0)  # the gradients are divided by it
    for opt in optimizers:
        opt.grad_scale = scale
    return norm


def run_dir_for(recipe) -> Path:
    return Path(recipe.train.out_dir or f"out/{recipe.name}")


@dataclass
class Session:
    """Everything a run needs between its steps."""

    recipe: object
    run_dir: Path
    d: Dist
    device: torch.device
    dtype: torch.dtype
    tok: object
    shards: ShardSet
    model: torch.nn.Module  # compiled and/or DDP-wrapped
    raw_model: torch.nn.Module
    optimizers: list
    sampler: object
    amp: object
    scaler: object
    seq_len: int
    tokens_per_step: int
    scored_per_step: int
    flops_per_token: float
    peak: float
    step: int = 0
    best_val: float = math.inf
    tokens_seen: int = 0
    elapsed: float = 0.0
    board: object = None  # toolkit.plot.TensorBoard when train.tensorboard is on (rank 0)
    terms: dict = field(default_factory=dict)  # the model's named training terms at the last log
    wall_s: float = 0.0  # wall seconds this run has trained, evals and checkpoints included, over all its resumes
    warmup_done: float | None = None  # the budget's fraction used where its schedule starts (warm-up's end, or step 1)


def train(recipe, run_dir: Path | None = None, resume: bool = False, init_from: Path | None = None,
          force: bool = False, stop_after: int = 0, time_limit: float = 0.0) -> dict:
    """Train `recipe` into `run_dir`; returns a summary (final step, val loss, ...).

    `stop_after` > 0 stops (with a checkpoint) after that many steps of this call, as Ctrl-C does:
    time-sliced jobs continue later with `resume`. `time_limit` > 0 does the same after that many seconds.
    """
    run_dir = Path(run_dir or run_dir_for(recipe))
    try:
        s = setup(recipe, run_dir, resume, init_from, force)
        last, stopped_early = fit(s, stop_after, time_limit)
        barrier(s.d)
        if s.board is not None:
            s.board.close()
    finally:
        run_lib.unlock(run_dir)
        end_distributed()
    summary = {"run": str(s.run_dir), "step": s.step, "stopped_early": stopped_early, "params": s.raw_model.num_params(),
               **{k: last.get(k) for k in ("loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s", "mfu")}}
    if stopped_early and s.d.master:
        info(f"stopped at step {s.step}; checkpoint saved. Continue with: lmkit train {s.run_dir} --resume")
    return summary


# --- setup ----------------------------------------------------------------------------------------------------


def setup(recipe, run_dir: Path | None, resume: bool, init_from: Path | None, force: bool) -> Session:
    from toolkit.shards.prepare import prepare
    from toolkit.shards.sampler import make_sampler

    tc = recipe.train
    d, device = init_distributed(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    run_dir = Path(run_dir or run_dir_for(recipe))
    if resume and (run_dir / run_lib.TOKENIZER / tokenizers.META_FILE).is_file():
        recipe = recipe.replace(tokenizer=replace(recipe.tokenizer, path=str(run_dir / run_lib.TOKENIZER)))
    if init_from is not None:
        init_from = Path(init_from)
        if not run_lib.is_run(init_from):
            raise UserError(f"--init-from {init_from}: not a run folder (needs model.safetensors and recipe.toml)")
        recipe = recipe.replace(tokenizer=replace(recipe.tokenizer, path=str(init_from / run_lib.TOKENIZER)))
    if d.master:
        prepare_run_dir(run_dir, resume, force)

    # data: rank 0 makes what is missing, the others wait and read it
    if d.master:
        prepared = prepare(recipe)
    barrier(d)
    if not d.master:
        prepared = prepare(recipe)
    tok = prepared.tokenizer
    shards = ShardSet(prepared.shards)
    shards.check_tokenizer(tok)
    if d.master and shards.split_rule != "meta.json":
        info(f"{shards.folder}: no meta.json, {shards.split_rule}")
    recipe = with_tokenizer(recipe, tok)
    seq_len = recipe.model.max_seq_len

    torch.manual_seed(tc.seed)
    # a family that initialises from the vocabulary (gpt2's rhyme init) gets each id's text
    strings = [tok.decode([i]) for i in range(tok.vocab_size)] if getattr(recipe.model, "rhyme_init", False) else None
    model = models.build(recipe.model, tok.vocab_size, token_strings=strings).to(device)
    if init_from is not None:
        run_lib.load_weights(model, init_from / run_lib.WEIGHTS)
    fsdp = d.enabled and tc.parallel == "fsdp"
    if fsdp:  # sharded in place; the optimizer is built on the shards
        muon = [n for n, o in tc.groups.items() if o.get("optimizer", tc.optimizer) == "muon"]
        if muon or tc.optimizer == "muon":
            raise UserError(f"optimizer = \"muon\" ({'train.groups.' + muon[0] if muon else 'train'}) does not run "
                            "under train.parallel = fsdp: torch.optim.Muon would orthogonalise each process's shard "
                            "of a matrix, not the matrix; use train.parallel = ddp")
        if dtype == torch.float16:
            raise UserError("train.parallel = fsdp trains in float32 or bfloat16 (float16's loss scaler would see "
                            "only each process's shard of the gradients); set train.dtype = bfloat16")
        model = distributed.shard_model(model, dtype, compile_blocks=tc.compile)
    optimizers = build_optimizers(model, tc, device.type)
    sampler = make_sampler(recipe, shards, "train", seq_len, tc.batch_size, tc.seed, model.objective)
    if tc.grad_accum % d.world:
        raise UserError(f"train.grad_accum = {tc.grad_accum} must be a multiple of the number of processes ({d.world})")

    s = Session(recipe=recipe, run_dir=run_dir, d=d, device=device, dtype=dtype, tok=tok, shards=shards,
                model=model, raw_model=model, optimizers=optimizers, sampler=sampler, amp=autocast(device, dtype),
                scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None, seq_len=seq_len,
                tokens_per_step=tc.batch_size * seq_len * tc.grad_accum,
                # positions the loss scores (a model that scores fewer than seq_len per row says so: attractor A1)
                scored_per_step=tc.batch_size * tc.grad_accum * model.scored_tokens(seq_len),
                flops_per_token=model.flops_per_token(seq_len),
                peak=peak_flops(device, dtype, tc.peak_flops) if d.master else 0.0)
    if resume:
        load_checkpoint(s)
    else:
        torch.manual_seed(tc.seed + d.rank)  # dropout noise differs per rank
    if fsdp:  # each block was compiled before it was sharded
        s.model = distributed.ShardedStep(s.model)
    if tc.compile and not fsdp:
        s.model = torch.compile(s.model)
    if d.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        s.model = DDP(s.model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if d.master:
        write_run_info(s, prepared, init_from)
        if tc.tensorboard:
            from toolkit.plot import TensorBoard

            s.board = TensorBoard(run_dir / "tensorboard")
    return s


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Check that `run_dir` may be trained into, and claim it (train.lock) before anything in it changes."""
    if (run_dir / run_lib.LOCK).is_file():
        run_lib.lock(run_dir)  # refuses while another process trains into it; takes over a stale lock
    if resume and not (run_dir / run_lib.STATE).is_file():
        raise UserError(f"{run_dir}: no checkpoint to resume from ({run_lib.STATE} missing)")
    if resume:
        finish_checkpoint(run_dir)
    if not resume and run_dir.exists() and any(p.name != run_lib.LOCK for p in run_dir.iterdir()):
        if not force:
            raise UserError(f"{run_dir} already holds a run; use --resume to continue it or --force to start over")
        for name in (run_lib.WEIGHTS, NEXT_WEIGHTS, run_lib.STATE, run_lib.METRICS, run_lib.RUN_INFO):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_lib.lock(run_dir)


def with_tokenizer(recipe, tok):
    """The recipe's model config with what it takes from the tokenizer (vocab size; T5: pad, EOS, sentinel ids)."""
    cfg = recipe.model
    vocab = tok.vocab_size
    if getattr(cfg, "vocab_size", 0) not in (0, vocab):
        raise UserError(f"[model].vocab_size = {cfg.vocab_size} but the tokenizer has {vocab} tokens "
                        "(set model.vocab_size = 0 to take the tokenizer's)")
    if "vocab_size" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = replace(cfg, vocab_size=vocab)
    if callable(getattr(cfg, "with_tokenizer", None)):
        cfg = cfg.with_tokenizer(tok)
    return recipe.replace(model=cfg)


def load_checkpoint(s: Session) -> None:
    state = run_lib.load_state(s.run_dir / run_lib.STATE)
    sharded = distributed.is_sharded(s.raw_model)
    weights_step = (full_weights_step(s.raw_model, s.run_dir / run_lib.WEIGHTS) if sharded
                    else run_lib.load_weights(s.raw_model, s.run_dir / run_lib.WEIGHTS))
    if weights_step != state["step"]:
        raise UserError(f"{s.run_dir}: model.safetensors is from step {weights_step} but state.pt from step "
                        f"{state['step']} (a checkpoint write was interrupted); restore one of them")
    if len(state["optimizers"]) != len(s.optimizers):
        raise UserError(f"{s.run_dir}: the optimizer setup changed since the checkpoint; cannot resume")
    if sharded:  # rank 0 reads the full tensors, every rank keeps its shard
        weights = load_file(s.run_dir / run_lib.WEIGHTS) if s.d.master else None
        distributed.load_full_state(s.raw_model, s.optimizers, weights, state["optimizers"] if s.d.master else None)
    for opt, saved in zip(s.optimizers, [] if sharded else state["optimizers"]):
        opt.load_state_dict(saved)
    s.sampler.set_state(state["sampler"])
    s.step, s.best_val = state["step"], state["best_val"]
    s.tokens_seen, s.elapsed = state["tokens_seen"], state["elapsed"]
    s.wall_s = state.get("wall_s", state["elapsed"])
    s.warmup_done = state.get("warmup_done")
    torch.set_rng_state(state["torch_rng"])
    if s.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], s.device)
    if s.d.master:
        truncate_after(s.run_dir / run_lib.METRICS, s.step)
        truncate_after(s.run_dir / SAMPLES, s.step)
        info(f"resuming {s.run_dir} at step {s.step}")


def write_run_info(s: Session, prepared, init_from) -> None:
    r, shards = s.recipe, s.shards
    s.tok.save(s.run_dir / run_lib.TOKENIZER)
    recipe_lib.save(r, s.run_dir / run_lib.RECIPE)
    n_params = s.raw_model.num_params()
    run_lib.write_json(s.run_dir / run_lib.RUN_INFO, {
        "recipe": r.name, "family": r.model.family, "params": n_params,
        "flops_per_token": s.flops_per_token, "seq_len": s.seq_len, "tokens_per_step": s.tokens_per_step,
        "device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."), "world_size": s.d.world,
        "data": {"corpus": str(prepared.corpus) if prepared.corpus else None, "shards": str(prepared.shards),
                 "tokenizer": str(prepared.tokenizer_dir), "tokenizer_fingerprint": s.tok.fingerprint,
                 "train_tokens": shards.tokens("train"), "val_tokens": shards.tokens("val"),
                 "val_sha256": _val_hash(shards)},
        "init_from": str(init_from) if init_from else None,
    })
    info(f"{r.name}: {r.model.family} with {n_params / 1e6:.2f} M parameters, "
         f"{s.tokens_per_step:,} tokens/step, {shards.tokens('train'):,} train tokens, on {s.device} ({s.dtype})"
         + (f" x {s.d.world} processes" if s.d.enabled else ""))


# --- fit ------------------------------------------------------------------------------------------------------


def next_batches(s: Session) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of the next step: every rank draws every micro-batch and keeps its own."""
    batches = []
    for m in range(s.recipe.train.grad_accum):
        which, offsets = s.sampler.draw()
        if m % s.d.world == s.d.rank:
            x, y = s.sampler.read(which, offsets)
            batches.append((torch.from_numpy(x).to(s.device, non_blocking=True),
                            torch.from_numpy(y).to(s.device, non_blocking=True)))
    return batches


clock = time.perf_counter  # the trainer's wall clock (tests replace it with a fake one)


def budget_done(s: Session, extra_s: float = 0.0, extra_tokens: int = 0) -> float:
    """The fraction of the run's budget (train.max_minutes and/or train.max_tokens) used, after `extra_s` more
    seconds and `extra_tokens` more tokens; 0 without a budget."""
    tc = s.recipe.train
    parts = [0.0]
    if tc.max_minutes:
        parts.append((s.wall_s + extra_s) / (60.0 * tc.max_minutes))
    if tc.max_tokens:
        parts.append((s.tokens_seen + extra_tokens) / tc.max_tokens)
    return max(parts)


EPOCHS_WARNING = 4  # passes over the training split past which a small model on a small corpus usually overfits


def epochs_warning(s: Session, tokens: int, ahead: bool) -> str | None:
    """The line to say when `tokens` (planned, if `ahead`, else read so far) are more than EPOCHS_WARNING passes
    over the training split; None otherwise."""
    train_tokens = s.shards.tokens("train")
    if not train_tokens or tokens <= EPOCHS_WARNING * train_tokens:
        return None
    passes = tokens / train_tokens if ahead else EPOCHS_WARNING
    what = f"will read its training split {passes:.1f} times" if ahead else f"has now read its training split {passes} times"
    return (f"this run {what} ({train_tokens:,} tokens): past about {EPOCHS_WARNING} passes val loss usually stops "
            "falling and then rises; watch it, or give more text or a smaller budget")


def fit(s: Session, stop_after: int = 0, time_limit: float = 0.0) -> tuple[dict, bool]:
    """Steps until max_iters, or until the budget is used (train.max_minutes / max_tokens: the lr schedule runs
    on the fraction of the budget done, and the last step leaves time for the final eval and checkpoint), or a
    stop. Logs, validates and saves on their intervals. Returns the last log record and whether the run stopped
    early. Losses stay on the device between log steps: no host sync per step."""
    from rich.progress import TextColumn

    from toolkit.console import progress

    tc, d = s.recipe.train, s.d
    budgeted = bool(tc.max_minutes or tc.max_tokens)
    schedule_from = 1 if tc.warmup_fraction else tc.warmup_iters  # the step where a budget's schedule starts
    feedback = getattr(s.sampler, "feedback", None)  # a sampler that learns from the losses (T5's curriculum)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last log
    window_start, window_steps = clock(), 0
    last: dict = {}
    start_step, start_time, wall_at_start = s.step, clock(), s.wall_s
    step_s = eval_s = 0.0  # how long a step and an eval + checkpoint take (for the budget's last step)
    total = 1000 if budgeted else tc.max_iters  # the progress bar counts per mille of a budget
    planned = 0 if tc.max_minutes else (tc.max_tokens or tc.max_iters * s.tokens_per_step)  # time may end it first
    warning = epochs_warning(s, planned, ahead=True) if planned else None
    if warning and d.master:
        info(warning)
    warned = warning is not None  # a time budget's passes are known only as they happen: said once, when crossed
    with StopFlag() as stop, progress(TextColumn("{task.fields[status]}")) as bar:
        task = bar.add_task("train", total=total, completed=0, status="", visible=d.master)
        while budgeted or s.step < tc.max_iters:
            # a budget's schedule runs from the end of warm-up to where training ends (before the final eval's
            # share of the time), so the lr is continuous at the warm-up's end and reaches its floor at the end.
            # With warmup_fraction the warm-up is in the schedule, which starts after the first step: that step
            # (and its compile, which can be a large part of a short budget) runs at lr 0, priming the moments
            if budgeted and s.step >= schedule_from and s.warmup_done is None:
                s.warmup_done = min(budget_done(s, eval_s), 0.99)
            done = 0.0 if budgeted and tc.warmup_fraction else None
            if budgeted and s.warmup_done is not None:
                done = (budget_done(s, eval_s) - s.warmup_done) / (1.0 - s.warmup_done)
            set_lr(s.optimizers, lr_factor(s.step, tc, done))
            t0 = clock()
            row_losses = [] if feedback is not None else None
            step_loss = train_step(s.model, s.raw_model, s.optimizers, next_batches(s), s.amp, tc.grad_clip,
                                   s.scaler, s.model.no_sync if d.enabled else None, row_losses)
            if feedback is not None:
                feedback(row_losses)
            s.step += 1
            s.tokens_seen += s.tokens_per_step
            pending.append((s.step, step_loss))
            window_steps += 1
            step_s = clock() - t0 if step_s == 0.0 else 0.9 * step_s + 0.1 * (clock() - t0)
            s.wall_s = wall_at_start + clock() - start_time
            if tc.max_minutes and s.step == start_step + 1:  # the final eval may be the first: its time, guessed
                eval_s = eval_seconds_ahead(s)

            # what ends the run here, agreed by every rank in one all-reduce (one rank's clock or Ctrl-C alone
            # would leave the others waiting): the budget's last step, Ctrl-C, train time_limit
            budget_last, interrupted, out_of_time = any_across(
                [budgeted and budget_done(s, step_s + eval_s, s.tokens_per_step) > 1.0, stop.stop,
                 bool(time_limit) and clock() - start_time >= time_limit], d, s.device)
            is_last = budget_last if budgeted else s.step == tc.max_iters
            is_eval = s.step % tc.eval_interval == 0 or is_last
            is_ckpt = is_eval or (tc.ckpt_interval and s.step % tc.ckpt_interval == 0)
            stopping = interrupted or (stop_after and s.step - start_step >= stop_after)
            stopping = (stopping or out_of_time) and not is_last
            if s.step % tc.log_interval == 0 or is_ckpt or stopping or is_last:
                dt = clock() - window_start
                last = log_window(s, pending, window_steps, dt)
                if not warned and (warning := epochs_warning(s, s.tokens_seen, ahead=False)):
                    warned = True
                    if d.master:
                        info(warning)
                done = round(1000 * min(1.0, budget_done(s))) if budgeted else s.step
                bar.update(task, completed=done, status=status_line(s, last))
                pending.clear()
                window_steps = 0
                window_start = clock()
            t_eval = clock()
            gathered = None
            if is_eval:
                ev = validate(s)
                s.best_val = min(s.best_val, ev["val_loss"])
                log(s, {"step": s.step, **ev})
                last.update(ev)
                gathered = gather_for_save(s)  # a sharded model's full state, once for the samples and the save
                sampled = model_to_sample(s, gathered[0])
                if d.master:
                    bpb = f" bpb {ev['val_bpb']:.3f}" if ev["val_bpb"] else ""
                    console.print(f"step {s.step}: val loss {ev['val_loss']:.4f} ppl {ev['val_ppl']:.2f}{bpb}"
                                  f"{s.sampler.status()}")
                    after_eval(s, sampled)
            if is_ckpt or stopping:
                s.wall_s = wall_at_start + clock() - start_time
                save(s, gathered)
            if is_eval:
                eval_s = max(eval_s, clock() - t_eval)
            s.wall_s = wall_at_start + clock() - start_time
            window_start = clock() if is_eval or is_ckpt else window_start
            if stopping:
                return last, True
            if is_last:
                break
    return last, False


def log_window(s: Session, pending: list, steps: int, dt: float) -> dict:
    """Check the losses since the last log (one host sync), write a metrics record, return it."""
    losses = mean_across(torch.stack([loss for _, loss in pending]), s.d)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        raise UserError(f"loss became {losses[int(bad[0])].item()} at step {pending[int(bad[0])][0]}; stopped. The "
                        f"last good checkpoint in {s.run_dir} is kept (try a lower train.lr or train.grad_clip)")
    s.elapsed += dt
    tps = steps * s.tokens_per_step / dt
    record = {"step": s.step, "loss": float(losses.mean()), "lr": s.optimizers[0].param_groups[0]["lr"],
              "tokens_per_s": tps, "mfu": tps * s.flops_per_token / s.peak if s.peak else None,
              "tokens": s.tokens_seen, "elapsed_s": s.elapsed}
    if s.scored_per_step != s.tokens_per_step:
        record["scored_tokens_per_s"] = tps * s.scored_per_step / s.tokens_per_step
    s.terms = s.raw_model.training_terms()
    record.update(s.terms)
    record.update(s.sampler.metrics())
    log(s, record)
    return record


def status_line(s: Session, r: dict) -> str:
    line = (f"loss {r['loss']:.4f} lr {r['lr']:.2e} {r['tokens_per_s']:,.0f} tok/s"
            + (f" MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""))
    if "scored_tokens_per_s" in r:
        line += f" ({r['scored_tokens_per_s']:,.0f} scored/s)"
    line += "".join(f" {name} {value:.3f}" for name, value in s.terms.items())
    return line + s.sampler.status()


def log(s: Session, record: dict) -> None:
    if s.d.master:
        with open(s.run_dir / run_lib.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if s.board is not None:
            s.board.scalars(record)


def model_to_sample(s: Session, full_weights: dict | None = None):
    """The model the eval samples come from: the training model, or for a sharded one (FSDP) an unsharded copy
    built on rank 0 from its full weights (`gather_for_save`'s, tied aliases left out; a sharded forward needs
    every rank, rank 0 alone samples). The other ranks get None."""
    if not (s.recipe.eval.prompts and distributed.is_sharded(s.raw_model)):
        return s.raw_model
    if full_weights is None:
        return None
    model = models.build(s.recipe.model, s.tok.vocab_size, init=False)
    aliases = {alias: full_weights[first] for alias, first in distributed.tied_aliases(model).items()}
    model.load_state_dict({**full_weights, **aliases}, assign=True)  # the gathered tensors themselves: no copy
    return model


def gather_for_save(s: Session) -> tuple[dict | None, list | None]:
    """A sharded model's (full weights, full optimizer states) on rank 0, as `save` writes them; (None, None) on
    the other ranks and for an unsharded model. A collective: every rank calls it."""
    if not distributed.is_sharded(s.raw_model):
        return None, None
    return distributed.gather_full_state(s.raw_model, s.optimizers)


def after_eval(s: Session, sampled) -> None:
    """Rank 0, after each eval: samples from the recipe's prompts (samples.jsonl) by `sampled` (model_to_sample),
    curves.png, TensorBoard flush."""
    ec, tc = s.recipe.eval, s.recipe.train
    if ec.prompts:
        window = None
        if s.raw_model.is_encoder_decoder:  # T5: the first val window, denoised
            from toolkit.shards.sampler import eval_windows

            window = next(eval_windows(s.shards, "val", s.seq_len, 1, 1))[0][0]
        rows = eval_samples(sampled, s.tok, s.step, ec, window)
        append_samples(s.run_dir, rows)
        if rows:
            text = " ".join(str(rows[0]["text"]).split())
            console.print(f"  sample: {rows[0]['prompt'][:40]!r} -> {text[:100]!r}", style="dim")
        for row in rows:
            if s.board is not None:
                s.board.sample(row)
    if tc.plot:
        from toolkit.plot import plot_runs

        plot_runs([s.run_dir], s.run_dir / "curves.png", labels=[s.recipe.name])
    if s.board is not None:
        s.board.flush()


# --- validate and save ----------------------------------------------------------------------------------------


def validate(s: Session, max_batches: int = 0) -> dict:
    """The val metrics on the first train.eval_iters batches (or `max_batches`)."""
    tc = s.recipe.train
    result = evaluate(s.raw_model, s.shards, "val", s.seq_len, s.recipe.eval.batch_size or tc.batch_size,
                      max_batches or tc.eval_iters, s.device, s.amp, s.tok.token_bytes())
    return {"val_loss": result.loss, "val_ppl": result.ppl, "val_bpb": result.bpb, **result.extras}


def eval_seconds_ahead(s: Session) -> float:
    """How long an eval will take, before one has run (called after the first step, which paid the first-call
    costs): one val batch timed, times the batches an eval reads. The samples and the checkpoint are measured at
    the first eval."""
    tc = s.recipe.train
    batch_size = s.recipe.eval.batch_size or tc.batch_size
    batches = min(tc.eval_iters, -(-sum(split_windows(s.shards, "val", s.seq_len)) // batch_size))
    t0 = clock()
    validate(s, max_batches=1)
    return (clock() - t0) * batches


NEXT_WEIGHTS = "model.next.safetensors"  # a checkpoint's new weights until its state.pt is in place


def save(s: Session, gathered: tuple[dict | None, list | None] | None = None) -> None:
    """The new weights beside the old ones (model.next.safetensors), then the training state, then the new weights
    in place: each written atomically, and state.pt's rename commits the checkpoint. A kill between two steps
    leaves a pair whose steps agree once resume has run `finish_checkpoint`. `gathered`: `gather_for_save`'s, when
    this step's eval has gathered them already (FSDP: every rank takes part in a gather)."""
    weights, optimizer_states = gathered if gathered is not None else gather_for_save(s)
    if not s.d.master:
        return
    run_lib.save_weights(s.raw_model if weights is None else FullWeights(weights), s.run_dir / NEXT_WEIGHTS, s.step)
    run_lib.save_state({
        "step": s.step, "sampler": s.sampler.state(),
        "optimizers": [o.state_dict() for o in s.optimizers] if optimizer_states is None else optimizer_states,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None,
        "best_val": s.best_val, "tokens_seen": s.tokens_seen, "elapsed": s.elapsed, "wall_s": s.wall_s,
        "warmup_done": s.warmup_done,
    }, s.run_dir / run_lib.STATE)
    os.replace(s.run_dir / NEXT_WEIGHTS, s.run_dir / run_lib.WEIGHTS)


class FullWeights:
    """Gathered full tensors (FSDP) where run_lib.save_weights takes a model: written as a single process's."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors


def full_weights_step(model, path: Path) -> int:
    """For a sharded model: the checks run_lib.load_weights makes, on model.safetensors' header alone (every rank
    checks, so all refuse together before rank 0 reads the tensors); returns the step recorded with them."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a file cut short or not safetensors
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}  # a DTensor's shape is the full one
    aliases = distributed.tied_aliases(model)
    missing = [k for k in expected if k not in shapes and aliases.get(k) not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the recipe's model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in shapes.items():
        if expected[k] != shape:
            raise UserError(f"{path}: {k} has shape {shape}, the recipe's model needs {expected[k]}")
    step = meta.get("step", "0")
    if not (isinstance(step, str) and step.isdecimal()):
        raise UserError(f"{path}: its metadata's step should be a whole number, got {step!r}")
    return int(step)


def finish_checkpoint(run_dir: Path) -> None:
    """After a kill inside `save`: model.next.safetensors of state.pt's step goes in place (state.pt was
    committed), one of another step (or unreadable) is removed (it was not)."""
    path = run_dir / NEXT_WEIGHTS
    if not path.is_file():
        return
    try:
        with safe_open(str(path), "pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
    except Exception:  # a file cut short: its checkpoint was never committed
        step = -1
    if step == run_lib.load_state(run_dir / run_lib.STATE)["step"]:
        os.replace(path, run_dir / run_lib.WEIGHTS)
    else:
        path.unlink()


def _val_hash(shards: ShardSet) -> str:
    h = hashlib.sha256()
    for a in shards.splits["val"]:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def resume_recipe(run_dir: Path, overrides: list[str]):
    """The recipe saved in a run folder, with --set overrides (e.g. a larger train.max_iters)."""
    if not run_lib.is_run(run_dir) and not (Path(run_dir) / run_lib.RECIPE).is_file():
        raise UserError(f"{run_dir} is not a run folder (no {run_lib.RECIPE})")
    r = recipe_lib.load(Path(run_dir) / run_lib.RECIPE, overrides)
    tokenizers.load(Path(run_dir) / run_lib.TOKENIZER)  # fails clearly if missing or edited
    return r
