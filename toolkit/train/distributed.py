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


def any_across(flags: list[bool], d: Dist, device) -> list[bool]:
    """Each flag, true on every process when it is true on one (so all ranks stop at the same step)."""
    if not d.enabled:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=device)
    dist.all_reduce(t)
    return [v > 0 for v in t.tolist()]


def end_distributed() -> None:
    """Tear the process group down before the process exits: gloo's threads left running at exit abort it
    ("terminate called without an active exception", seen after FSDP bf16 all-gathers)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# --- FSDP2 (train.parallel = "fsdp") ----------------------------------------------------------------------------
#
# Each transformer block is one FSDP unit (its parameters all-gathered for its forward and backward, its gradients
# reduce-scattered after), the root holds the rest (embeddings, final norm, head). Parameters, gradients and the
# optimizer state are sharded across the processes; checkpoints are gathered to rank 0 and written as the same
# full tensors a single process writes, so a run folder does not depend on how it was trained.


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a model, each one FSDP unit: the model's `sharding_units()` (toolkit.models.base), or for
    another module the same guess the protocol's default makes. None: the root is the only unit."""
    from toolkit.models.base import LanguageModel, repeated_blocks

    return model.sharding_units() if isinstance(model, LanguageModel) else repeated_blocks(model)


def shard_model(model: torch.nn.Module, dtype: torch.dtype, compile_blocks: bool = False) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on each transformer block, then on the root. Under bf16 the blocks compute
    with bf16 parameters and reduce gradients in fp32 (the sharded master weights stay fp32); otherwise all fp32.
    With `compile_blocks` each block is compiled before it is sharded (in place, `nn.Module.compile`, so the
    state dict's names do not change). Build the optimizer after this: its parameters are the DTensor shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh of the model's device (FSDP's default is the accelerator's, even for train.device = cpu)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == torch.bfloat16
          else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is an FSDP2 root (train.parallel = fsdp under torchrun)."""
    if not dist.is_available():  # a torch build without torch.distributed
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class ShardedStep:
    """What the training step calls under FSDP: the sharded model, and a `no_sync` like DDP's that syncs anyway.
    FSDP reduce-scatters each micro-batch's gradients into the sharded ones: skipping it (as DDP skips its
    all-reduce) would keep a full unsharded gradient on every rank, the memory FSDP is there to save."""

    def __init__(self, model: torch.nn.Module):
        self.module = model

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        from contextlib import nullcontext

        return nullcontext()


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{name: the first name of the same tensor} for each later name of a shared (tied) tensor, in state dict
    order: what toolkit.run.weights_dict leaves out of model.safetensors."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _param_names(model: torch.nn.Module, optimizer) -> dict[int, str]:
    """{the id a single process's optimizer.state_dict() gives each parameter: its name in the model}."""
    names = {id(p): n for n, p in model.named_parameters()}  # a tied tensor once, under its first name
    packed = optimizer.state_dict()["param_groups"]
    return {i: names[id(p)] for g, pg in zip(packed, optimizer.param_groups) for i, p in zip(g["params"], pg["params"])}


def gather_full_weights(model: torch.nn.Module) -> dict | None:
    """The sharded model's state_dict as full CPU tensors on rank 0 (tied aliases included, as a single process's
    state_dict has them); None on the others. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if dist.get_rank() == 0 else None


def gather_full_state(model: torch.nn.Module, optimizers: list) -> tuple[dict | None, list | None]:
    """The sharded model's weights (tied aliases left out) and each optimizer's state_dict, as full CPU tensors
    in exactly a single process's layout (the optimizer's state keyed by parameter index), on rank 0; (None,
    None) on the others. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = gather_full_weights(model)
    full_optims = [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]
    if dist.get_rank() != 0:
        return None, None
    for alias in tied_aliases(model):
        weights.pop(alias, None)
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    states = []
    for opt, full in zip(optimizers, full_optims):
        local = opt.state_dict()  # param_groups: the hyperparameters and the single-process parameter ids
        by_name = full["state"]
        states.append({"state": {i: by_name[name] for i, name in _param_names(model, opt).items() if name in by_name},
                       "param_groups": local["param_groups"]})
    return weights, states


def load_full_state(model: torch.nn.Module, optimizers: list, weights: dict | None,
                    optimizer_states: list | None) -> None:
    """Load full weights (as model.safetensors holds them) and single-process optimizer state_dicts into the
    sharded model and its optimizers: rank 0 passes them, the others None; rank 0's tensors are broadcast and
    each rank keeps its shard. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    rank0 = dist.get_rank() == 0
    if rank0:
        weights = dict(weights)
        for alias, name in tied_aliases(model).items():
            weights.setdefault(alias, weights[name])
    set_model_state_dict(model, weights if rank0 else {}, options=options)
    for k, opt in enumerate(optimizers):
        saved = optimizer_states[k] if rank0 else None
        if rank0:
            names = _param_names(model, opt)
            saved = {"state": {names[i]: v for i, v in saved["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, opt, saved if rank0 else {}, options=options)
