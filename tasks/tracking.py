"""MLflow plumbing shared by the tasks: one experiment per seqmodels experiment, one parent run
per pipeline run, one child run per trained model. Everything goes through explicit run ids
(MlflowClient), never the thread-local "active run", because Prefect may run tasks in threads.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

# MLflow 3 sends usage telemetry unless told not to; a pipeline on a schedule should not.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def mlflow_client(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a SQLite database, so one folder holds the whole local store."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides where artifacts go


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = _local_artifact_root(tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another pipeline run created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config as MLflow params: {"clean.min_chars": "1", ...} (values capped at 500)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: str(value)[:500]}


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [mlflow.entities.Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # the batch API takes at most 100 params
        client.log_batch(run_id, params=items[start : start + 100])


def code_commit() -> str:
    """The git commit of the running code, with '-dirty' when the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


class MetricLogger:
    """The training callback that sends seqmodels' metrics to an MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        items = [
            mlflow.entities.Metric(k, float(v), mlflow.utils.time.get_current_time_millis(), step)
            for k, v in metrics.items()
        ]
        self.client.log_batch(self.run_id, metrics=items)
