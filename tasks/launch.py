"""The train task's model trained by several worker processes (training.distributed).

The train task builds a `TrainRequest` (everything a worker needs, picklable) and hands it to
`launch_training`, which starts the workers with torch's elastic launcher
(seqmodels.training.distributed.launch). Every worker rebuilds the training from the request
and trains its share of each global batch; rank 0 alone sends the metrics to the task's MLflow
run and writes the model folder, and its summary is the task's. A worker that fails fails the
task with its rank and error (WorkerFailed).

The other nodes of a multi-node training run

    python -m tasks.launch join --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT

(node rank from --node-rank, or the pod index of a Kubernetes indexed Job); their workers get
the request from rank 0, so they need the image and the shared work_dir, not the config.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

from seqmodels.config import parse_model_spec
from seqmodels.models.folder import train_model
from seqmodels.training import distributed
from seqmodels.training.distributed import WorkerFailed, launch
from seqmodels.training.progress import TrainingProgress
from seqmodels.training.settings import DistributedSettings
from seqmodels.training.trainer import MetricsCallback, ProgressCallback

log = logging.getLogger(__name__)


@dataclass
class TrainRequest:
    """One model's training, as the train task would run it in its own process."""

    model_name: str
    spec: dict[str, Any]  # the ModelSpec as JSON (pydantic's union models do not pickle)
    task_kind: str
    decoding: dict[str, Any]
    parquet: str
    spm_model: str | None
    out_dir: str
    tracking_uri: str  # rank 0 logs the metrics to this MLflow run
    run_id: str
    init_from: str | None = None  # a warm start's model folder (local or shared)


def train_worker(request: TrainRequest | None) -> dict[str, Any] | None:
    """The worker entry point: train the request's model (a joining node's workers get rank
    0's request); rank 0 returns the summary."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    distributed.join_group()
    request = distributed.broadcast_object(request)
    rank = distributed.process_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    on_metrics = on_progress = None
    if rank == 0:
        # Imported here: only rank 0 talks to MLflow (importing it costs every worker seconds).
        from tasks.tracking import MetricLogger, mlflow_client

        on_metrics = MetricLogger(mlflow_client(request.tracking_uri), request.run_id)
        on_progress = TrainingProgress(request.model_name, log)
    summary = train_request(request, on_metrics, on_progress)
    return summary if rank == 0 else None


def train_request(
    request: TrainRequest,
    on_metrics: MetricsCallback | None,
    on_progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Train the request's model in this process (alone, or as one rank of a launch)."""
    return train_model(
        parse_model_spec(request.spec),
        request.task_kind,
        Path(request.parquet),
        Path(request.spm_model) if request.spm_model else None,
        Path(request.out_dir),
        decoding=request.decoding,
        on_metrics=on_metrics,
        on_progress=on_progress,
        init_from=Path(request.init_from) if request.init_from else None,
    )


def launch_training(request: TrainRequest, settings: DistributedSettings) -> dict[str, Any]:
    """Train the request's model on settings.nproc_per_node processes here (node 0 of
    settings.nnodes); returns rank 0's summary, or raises WorkerFailed."""
    results = launch(settings, train_worker, (request,))
    return results[0]


def join(settings: DistributedSettings, node_rank: int, idle_timeout_s: int = 900) -> int:
    """Serve as node `node_rank` for every training node 0 launches, until none comes within
    `idle_timeout_s`; returns how many trainings this node took part in."""
    joined, deadline = 0, time.monotonic() + idle_timeout_s
    while time.monotonic() < deadline:
        try:
            launch(
                settings,
                train_worker,
                (None,),
                node_rank=node_rank,
                rendezvous_timeout_s=max(1, int(deadline - time.monotonic())),
            )
        except (RendezvousTimeoutError, TimeoutError, dist.DistError) as exc:
            # Node 0 is not listening: between two trainings, or its pipeline run is over.
            log.debug("no training to join yet (%s)", exc)
            time.sleep(1)
            continue
        except WorkerFailed as exc:  # node 0 fails its task with the error; it may retry
            log.error("%s", exc)
        joined, deadline = joined + 1, time.monotonic() + idle_timeout_s
        # Node 0 closes the finished training's rendezvous as its workers exit: let it, so
        # that the next attempt meets the next training, not the end of this one.
        time.sleep(5)
    return joined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Join node 0's distributed trainings.")
    parser.add_argument("command", choices=["join"])
    parser.add_argument("--nnodes", type=int, default=int(os.environ.get("SEQMODELS_NNODES", 2)))
    parser.add_argument(
        "--nproc-per-node", type=int, default=int(os.environ.get("SEQMODELS_NPROC_PER_NODE", 1))
    )
    parser.add_argument("--rdzv-endpoint", default=os.environ.get("SEQMODELS_RDZV_ENDPOINT"))
    parser.add_argument(
        "--node-rank",
        type=int,
        default=int(
            os.environ.get("SEQMODELS_NODE_RANK", os.environ.get("JOB_COMPLETION_INDEX", 1))
        ),
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=int,
        default=900,
        help="stop when node 0 launches no training for this long (its pipeline run is over)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = DistributedSettings(
        nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint
    )
    if args.node_rank < 1:
        parser.error("node 0 runs the pipeline; a joining node has --node-rank >= 1")
    log.info(
        "node %d joined %d training(s)",
        args.node_rank,
        join(settings, args.node_rank, args.idle_timeout_s),
    )


if __name__ == "__main__":
    main()
