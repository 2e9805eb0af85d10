"""The one training loop, used by every model family.

Single process or DDP under torchrun (nccl on GPU, gloo on CPU). Every rank draws the same global
stream of micro-batches and keeps its own share, so a DDP run's global batch equals a single
process's. Checkpoints are atomic; `resume` continues bit for bit (on CPU) where a run stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from toolkit import models, tokenizers
from toolkit import recipe as recipe_lib
from toolkit import run as run_lib
from toolkit.console import console, info
from toolkit.device import autocast, keep_freed_memory, peak_flops, resolve_device, resolve_dtype
from toolkit.errors import UserError
from toolkit.evaluate import evaluate
from toolkit.shards.format import ShardSet
from toolkit.train.optim import build_optimizers, lr_factor, set_lr


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return Dist(), resolve_device(device_name)
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


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
        console.print("\n[yellow]stopping after this step and saving a checkpoint (Ctrl-C again to abort)[/]")

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
        opt.__dict__.pop("grad_scale", None)  # the clipping factor is for this step only
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


def _metrics_truncate(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(recipe, run_dir: Path | None = None, resume: bool = False, init_from: Path | None = None,
          force: bool = False, stop_after: int = 0, time_limit: float = 0.0) -> dict:
    """Train `recipe` into `run_dir`; returns a summary (final step, val loss, ...).

    `stop_after` > 0 stops (with a checkpoint) after that many steps of this call, as Ctrl-C does:
    time-sliced jobs continue later with `resume`. `time_limit` > 0 does the same after that many seconds.
    """
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
        if resume and not (run_dir / run_lib.STATE).is_file():
            raise UserError(f"{run_dir}: no checkpoint to resume from ({run_lib.STATE} missing)")
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            if not force:
                raise UserError(f"{run_dir} already holds a run; use --resume to continue it or --force to start over")
            for name in (run_lib.WEIGHTS, run_lib.STATE, run_lib.METRICS, run_lib.RUN_INFO):
                (run_dir / name).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)

    # data: rank 0 makes what is missing, the others wait and read it
    if d.master:
        prepared = prepare(recipe)
    if d.enabled:
        dist.barrier()
    if not d.master:
        prepared = prepare(recipe)
    tok = prepared.tokenizer
    shards = ShardSet(prepared.shards)
    shards.check_tokenizer(tok)
    vocab = tok.vocab_size
    if getattr(recipe.model, "vocab_size", 0) not in (0, vocab):
        raise UserError(f"[model].vocab_size = {recipe.model.vocab_size} but the tokenizer has {vocab} tokens "
                        "(set model.vocab_size = 0 to take the tokenizer's)")
    if hasattr(recipe.model, "vocab_size"):
        recipe = recipe.replace(model=replace(recipe.model, vocab_size=vocab))
    if hasattr(recipe.model, "with_tokenizer"):  # ids a family takes from the tokenizer (T5: pad, EOS, sentinels)
        recipe = recipe.replace(model=recipe.model.with_tokenizer(tok))
    seq_len = recipe.model.max_seq_len

    torch.manual_seed(tc.seed)
    model = models.build(recipe.model, vocab).to(device)
    if init_from is not None:
        run_lib.load_weights(model, init_from / run_lib.WEIGHTS)
    optimizers = build_optimizers(model, tc, device.type)
    sampler = make_sampler(recipe, shards, "train", seq_len, tc.batch_size, seed=tc.seed)
    objective = model.make_objective(tc.seed) if hasattr(model, "make_objective") else None
    if tc.grad_accum % d.world:
        raise UserError(f"train.grad_accum = {tc.grad_accum} must be a multiple of the number of processes ({d.world})")

    step, best_val, tokens_seen, elapsed = 0, math.inf, 0, 0.0
    if resume:
        state = run_lib.load_state(run_dir / run_lib.STATE)
        weights_step = run_lib.load_weights(model, run_dir / run_lib.WEIGHTS)
        if weights_step != state["step"]:
            raise UserError(f"{run_dir}: model.safetensors is from step {weights_step} but state.pt from step "
                            f"{state['step']} (a checkpoint write was interrupted); restore one of them")
        if len(state["optimizers"]) != len(optimizers):
            raise UserError(f"{run_dir}: the optimizer setup changed since the checkpoint; cannot resume")
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        sampler.set_state(state["sampler"])
        if objective is not None:
            objective.set_state(state["objective"])
        step, best_val = state["step"], state["best_val"]
        tokens_seen, elapsed = state["tokens_seen"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if d.master:
            _metrics_truncate(run_dir / run_lib.METRICS, step)
            info(f"resuming {run_dir} at step {step}")
    else:
        torch.manual_seed(tc.seed + d.rank)  # dropout noise differs per rank

    raw_model = model
    if tc.compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)

    n_params = raw_model.num_params()
    flops_per_token = raw_model.flops_per_token(seq_len)
    peak = peak_flops(device, dtype, tc.peak_flops) if d.master else 0.0
    token_bytes = tok.token_bytes() if hasattr(tok, "token_bytes") else None
    tokens_per_step = tc.batch_size * seq_len * tc.grad_accum
    # positions the loss scores (a model that scores fewer than seq_len per row says so: attractor A1 scores 1)
    scored_per_step = tc.batch_size * tc.grad_accum * (
        raw_model.scored_tokens(seq_len) if hasattr(raw_model, "scored_tokens") else seq_len)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    amp = autocast(device, dtype)

    if d.master:
        tok.save(run_dir / run_lib.TOKENIZER)
        recipe_lib.save(recipe, run_dir / run_lib.RECIPE)
        run_lib.write_json(run_dir / run_lib.RUN_INFO, {
            "recipe": recipe.name, "family": recipe.model.family, "params": n_params,
            "flops_per_token": flops_per_token, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "world_size": d.world,
            "data": {"corpus": str(prepared.corpus) if prepared.corpus else None, "shards": str(prepared.shards),
                     "tokenizer": str(prepared.tokenizer_dir), "tokenizer_fingerprint": tok.fingerprint,
                     "train_tokens": shards.tokens("train"), "val_tokens": shards.tokens("val"),
                     "val_sha256": _val_hash(shards)},
            "init_from": str(init_from) if init_from else None,
        })
        info(f"{recipe.name}: {recipe.model.family} with {n_params / 1e6:.2f} M parameters, "
             f"{tokens_per_step:,} tokens/step, {shards.tokens('train'):,} train tokens, on {device} ({dtype})"
             + (f" x {d.world} processes" if d.enabled else ""))

    def run_eval() -> dict:
        result = evaluate(raw_model, shards, "val", seq_len, recipe.eval.batch_size or tc.batch_size, tc.eval_iters,
                          device, amp, token_bytes)
        return {"val_loss": result.loss, "val_ppl": result.ppl, "val_bpb": result.bpb, **result.extras}

    def save(at_step: int) -> None:
        if not d.master:
            return
        run_lib.save_weights(raw_model, run_dir / run_lib.WEIGHTS, at_step)
        run_lib.save_state({
            "step": at_step, "optimizers": [o.state_dict() for o in optimizers], "sampler": sampler.state(),
            "objective": objective.state() if objective is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best_val": best_val, "tokens_seen": tokens_seen, "elapsed": elapsed,
        }, run_dir / run_lib.STATE)

    def log(record: dict) -> None:
        if d.master:
            with open(run_dir / run_lib.METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    model.train()
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last check: no host sync per step
    window_start, window_steps = time.perf_counter(), 0
    last_record: dict = {}
    stopped_early = False

    def check_finite() -> None:
        if not pending:
            return
        losses = torch.stack([loss for _, loss in pending])
        if d.enabled:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                losses /= d.world
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            bad_step = pending[int(bad[0])][0]
            raise UserError(f"loss became {losses[int(bad[0])].item()} at step {bad_step}; stopped. The last good "
                            f"checkpoint in {run_dir} is kept (try a lower train.lr or train.grad_clip)")
        return losses

    from rich.progress import TextColumn

    from toolkit.console import progress

    start_step, start_time = step, time.perf_counter()
    with StopFlag() as stop, progress(TextColumn("{task.fields[status]}")) as bar:
        task = bar.add_task("train", total=tc.max_iters, completed=step, status="", visible=d.master)
        while step < tc.max_iters:
            set_lr(optimizers, lr_factor(step, tc))
            batches, buckets = [], []
            if objective is not None:
                objective.begin_step()
            for m in range(tc.grad_accum):  # all ranks draw every micro-batch; each keeps its own
                which, offsets = sampler.draw()
                if m % d.world == d.rank:
                    x, y = sampler.read(which, offsets)
                    if objective is not None:
                        x, y, b = objective.train_batch(x, step, m)
                        buckets.append(b)
                    batches.append((torch.from_numpy(x).to(device, non_blocking=True),
                                    torch.from_numpy(y).to(device, non_blocking=True)))
            row_losses = [] if objective is not None else None
            step_loss = train_step(model, raw_model, optimizers, batches, amp, tc.grad_clip, scaler,
                                   model.no_sync if d.enabled else None, row_losses)
            if objective is not None:
                objective.update(*_gather_rows(buckets, row_losses, d))
            step += 1
            tokens_seen += tokens_per_step
            pending.append((step, step_loss))
            window_steps += 1

            is_eval = step % tc.eval_interval == 0 or step == tc.max_iters
            is_ckpt = is_eval or (tc.ckpt_interval and step % tc.ckpt_interval == 0)
            if d.enabled:
                flag = torch.tensor(float(stop.stop), device=device)
                dist.all_reduce(flag)
                stopping = flag.item() > 0
            else:
                stopping = stop.stop
            stopping = stopping or (stop_after and step - start_step >= stop_after)
            stopping = (stopping or (time_limit and time.perf_counter() - start_time >= time_limit)) and step < tc.max_iters
            if step % tc.log_interval == 0 or is_ckpt or stopping or step == tc.max_iters:
                losses = check_finite()
                now = time.perf_counter()
                dt = now - window_start
                elapsed += dt
                tps = window_steps * tokens_per_step / dt
                mfu = tps * flops_per_token / peak if peak else None
                last_record = {"step": step, "loss": float(losses.mean()), "lr": optimizers[0].param_groups[0]["lr"],
                               "tokens_per_s": tps, "mfu": mfu, "tokens": tokens_seen, "elapsed_s": elapsed}
                status = (f"loss {last_record['loss']:.4f} lr {last_record['lr']:.2e} {tps:,.0f} tok/s"
                          + (f" MFU {100 * mfu:.1f}%" if mfu is not None else ""))
                if scored_per_step != tokens_per_step:
                    last_record["scored_tokens_per_s"] = tps * scored_per_step / tokens_per_step
                    status += f" ({last_record['scored_tokens_per_s']:,.0f} scored/s)"
                if objective is not None:
                    last_record.update(objective.metrics())
                    status += objective.status()
                log(last_record)
                bar.update(task, completed=step, status=status)
                pending.clear()
                window_steps = 0
                window_start = time.perf_counter()
            if is_eval:
                ev = run_eval()
                best_val = min(best_val, ev["val_loss"])
                log({"step": step, **ev})
                last_record.update(ev)
                if d.master:
                    bpb = f" bpb {ev['val_bpb']:.3f}" if ev["val_bpb"] else ""
                    crclm = objective.status() if objective is not None else ""
                    console.print(f"step {step}: val loss {ev['val_loss']:.4f} ppl {ev['val_ppl']:.2f}{bpb}{crclm}")
                window_start = time.perf_counter()
            if is_ckpt or stopping:
                save(step)
                window_start = time.perf_counter()
            if stopping:
                stopped_early = True
                break
    if d.enabled:
        dist.barrier()
    summary = {"run": str(run_dir), "step": step, "stopped_early": stopped_early, "params": n_params,
               **{k: last_record.get(k) for k in ("loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s", "mfu")}}
    if stopped_early and d.master:
        info(f"stopped at step {step}; checkpoint saved. Continue with: lmkit train {run_dir} --resume")
    return summary


def _gather_rows(buckets: list, row_losses: list, d: Dist) -> tuple[np.ndarray, np.ndarray]:
    """Every micro-batch's (bucket, loss) per row in the global micro-batch order, on every rank (DDP: each rank
    ran micro-batches m with m % world == rank), so an objective's state stays the same on all ranks."""
    losses = torch.stack(row_losses).float()  # (micro-batches of this rank, B)
    mine = torch.from_numpy(np.stack(buckets)).to(losses.device)
    if d.enabled:
        parts = [torch.empty_like(losses) for _ in range(d.world)]
        dist.all_gather(parts, losses.contiguous())
        bucket_parts = [torch.empty_like(mine) for _ in range(d.world)]
        dist.all_gather(bucket_parts, mine.contiguous())
        # rank r holds micro-batches r, r + world, ...: interleave back to 0, 1, 2, ...
        losses = torch.stack(parts, dim=1).flatten(0, 1)
        mine = torch.stack(bucket_parts, dim=1).flatten(0, 1)
    return mine.cpu().numpy().reshape(-1), losses.cpu().numpy().reshape(-1)


def _val_hash(shards: ShardSet) -> str:
    import hashlib

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
