"""Data-parallel training: launching the worker processes, joining the process group and the
few collective operations the trainer needs.

The trainer calls `setup` itself: when the launcher's variables say WORLD_SIZE > 1 it joins
the process group (NCCL on CUDA, gloo on CPU) and wraps the model in DistributedDataParallel.
Every rank draws the same global batch and keeps its slice, rank 0 alone writes files and
reports metrics. Workers are started either by torchrun (seqmodels.torchrun) or, from a
program such as the pipeline's train task, by `launch` (torch's elastic launch API, what
torchrun itself runs).
"""

from __future__ import annotations

import atexit
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from seqmodels.training.settings import DistributedSettings

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


def join_group() -> None:
    """Join the launch's process group before the trainer does, so that rank 0 can send the
    others their work (a node that joins a multi-node launch knows nothing else): gloo for CPU
    tensors, and NCCL for CUDA ones when this machine has a GPU."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    atexit.register(_destroy_group)


def broadcast_object(value: Any) -> Any:
    """Rank 0's (picklable) value on every rank of the joined group; `value` alone without one."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def process_rank() -> int:
    """This process's global rank (0 outside a launch)."""
    return int(os.environ.get("RANK", "0"))


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


class WorkerFailed(RuntimeError):
    """A worker process of a launch failed; the message names its rank and its error."""

    def __init__(self, rank: int, error: str):
        super().__init__(f"training worker rank {rank} failed: {error}")
        self.rank, self.error = rank, error
        # The worker's exception class ("ValueError"), "" when it died without one (a signal).
        head = error.split(":", 1)[0]
        self.exception = head if head.isidentifier() else ""


def launch(
    settings: DistributedSettings,
    entrypoint: Callable[..., Any],
    args: tuple = (),
    *,
    node_rank: int = 0,
    run_id: str | None = None,
    rendezvous_timeout_s: int = 900,
) -> dict[int, Any]:
    """Run `entrypoint(*args)` in settings.nproc_per_node processes on this node (the ranks of
    node `node_rank` of settings.nnodes), with torch's elastic launcher; returns the return
    values of this node's workers by global rank. `entrypoint` must be a module-level
    function and `args` picklable (the workers are spawned). WorkerFailed names the first
    rank that failed and its exception with its traceback. `rendezvous_timeout_s`: how long
    the nodes wait for each other."""
    if settings.nnodes == 1:
        # torchrun --standalone: a private rendezvous on a free local port.
        rendezvous = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0"}
        rendezvous["run_id"] = run_id or uuid.uuid4().hex
    else:
        # Node ranks are fixed (the pod index), so node 0, which runs the pipeline, holds rank
        # 0: the rank that reports metrics and writes the model folder.
        rendezvous = {"rdzv_backend": "static", "rdzv_endpoint": settings.rdzv_endpoint}
        rendezvous.update(run_id=run_id or "seqmodels", rdzv_configs={"rank": node_rank})
    config = LaunchConfig(
        min_nodes=settings.nnodes,
        max_nodes=settings.nnodes,
        nproc_per_node=settings.nproc_per_node,
        max_restarts=settings.max_restarts,
        start_method="spawn",
        rdzv_timeout=rendezvous_timeout_s,
        **rendezvous,
    )
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise WorkerFailed(rank, failure_text(failure)) from None


def failure_text(failure: ProcessFailure) -> str:
    """A worker's exception and traceback from its error file, or how it ended (a signal)."""
    message = failure.error_file_data.get("message")
    if isinstance(message, dict):  # written by @record: the exception and its traceback
        trace = message.get("extraInfo", {}).get("py_callstack", "")
        return f"{message.get('message', '')}\n{trace}".strip()
    return f"{failure.message} (exit code {failure.exitcode})"
