"""Data-parallel training: one process per device, gradients averaged by ``DistributedDataParallel``.

Start it with ``torchrun`` (``torchrun --nproc_per_node=2 -m scratchlm pretrain ...``): torchrun
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`from_env` joins the process group (gloo on CPU, nccl on CUDA).  Without those variables
everything here is a no-op for a single process, so the training loop has one code path.

How the work is split (the trainer does it; listed here because it is the contract):

* every global step consumes ``batch_size × grad_accum × world_size`` examples of one shared,
  seeded permutation; rank ``r`` takes its own ``batch_size`` slice of each micro-batch, so the
  union over ranks is exactly what one process with a ``world_size``-times larger batch sees;
* losses are sums with counts (``training.losses``): the counts are all-reduced once per step and
  the gradients divided by the global count, which makes the result equal, up to float
  summation order, to one process over the whole batch;
* rank 0 alone writes the run dir, prints and samples; the other ranks' random states are
  gathered into its checkpoint so that every rank resumes its own dropout stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scratchlm.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env(device: str | torch.device | None = None) -> DistContext:
    """Join the process group described by torchrun's environment, or a single-process context."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return init(rank, world, device=device, local_rank=local_rank)


def init(rank: int, world_size: int, *, device: str | torch.device | None = None,
         local_rank: int | None = None, init_method: str | None = None) -> DistContext:
    """Join a process group explicitly (tests spawn processes with a ``file://`` init method)."""
    local_rank = rank if local_rank is None else local_rank
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                init_method=init_method or "env://")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` across the group; the model itself for one process."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a no-op for one process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rng_states(ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's CPU torch RNG state (rank order), for rank 0's checkpoint."""
    state = torch.get_rng_state()
    if not ctx.enabled:
        return [state]
    local = state.to(ctx.device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    return [t.cpu() for t in gathered]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
