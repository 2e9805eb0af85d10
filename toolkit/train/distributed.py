"""Processes: one, or several under torchrun (DDP; nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from toolkit.device import resolve_device


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


def mean_across(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean over processes of each value (gloo has no AVG)."""
    if not d.enabled:
        return values
    if values.device.type == "cuda":
        dist.all_reduce(values, op=dist.ReduceOp.AVG)
        return values
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / d.world


def any_across(flag: bool, d: Dist, device) -> bool:
    """True on every process when it is true on one (Ctrl-C on one rank stops them all at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return t.item() > 0


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
