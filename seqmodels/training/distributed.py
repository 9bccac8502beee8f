"""Data-parallel training under torchrun: joining the process group and the few collective
operations the trainer needs.

The trainer calls `setup` itself: when torchrun's variables say WORLD_SIZE > 1 it joins the
process group (NCCL on CUDA, gloo on CPU) and wraps the model in DistributedDataParallel.
Every rank draws the same global batch and keeps its slice, rank 0 alone writes files and
reports metrics. The command that trains a model under torchrun is seqmodels.torchrun.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # One group per process, reused by later trainings (recipes train several models).
        atexit.register(_destroy_group)
    return DistContext(rank, world, local_rank), device


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so token counts stay exact)."""
    if ctx.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_float(value: float, ctx: DistContext, device: torch.device) -> float:
    """Rank 0's value on every rank."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()
