"""Prefect task that registers a model version and moves the champion alias when it wins."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task
from prefect.artifacts import create_markdown_artifact

import seqmodels
from tasks.tracking import mlflow_client

CHAMPION = "champion"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# The pyfunc needs these at load time; listing them saves MLflow ~5 s of inference per model.
PIP_REQUIREMENTS = ["torch", "numpy", "sentencepiece", "pyarrow", "pandas"]


def _signature(task_kind: str) -> ModelSignature:
    default = "translate" if task_kind == "translation" else "generate"
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("task", "string", default),
                ParamSpec("max_new_tokens", "long", 60),
                ParamSpec("temperature", "double", 0.8),
            ]
        ),
    )


def champion_score(
    client: mlflow.MlflowClient, name: str, metric: str
) -> tuple[str | None, float | None]:
    """(version, primary metric) of the current champion, or (None, None) when there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = client.get_run(version.run_id).data.metrics.get(metric)
    return version.version, value


def beats(challenger: float, champion: float | None, higher_is_better: bool) -> bool:
    if champion is None or math.isnan(champion):
        return True
    return challenger > champion if higher_is_better else challenger < champion


@task(name="register", timeout_seconds=1800)
def register_model_version(
    registered_name: str,
    model_name: str,
    trained: dict,
    metrics: dict[str, float],
    task_kind: str,
    primary_metric: str,
    higher_is_better: bool,
    tracking_uri: str,
    lineage: dict[str, str],
) -> dict:
    """Log the pyfunc, register it, and give it `champion` only if it beats the champion."""
    client = mlflow_client(tracking_uri)
    run_id = trained["run_id"]
    example = ["Ein Mann fährt Fahrrad."] if task_kind == "translation" else ["ROMEO:"]
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is given explicitly; MLflow's hint about type hints does not apply.
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model_dir": trained["model_dir"]},
            code_paths=[str(Path(seqmodels.__file__).parent)],
            pip_requirements=PIP_REQUIREMENTS,
            signature=_signature(task_kind),
            input_example=example,
            registered_model_name=registered_name,
        )
    version = str(info.registered_model_version)
    score = metrics[primary_metric]
    previous_version, previous_score = champion_score(client, registered_name, primary_metric)
    promoted = beats(score, previous_score, higher_is_better)
    tags = {
        **lineage,
        "model_name": model_name,
        "mlflow_run_id": run_id,
        primary_metric: f"{score:.6f}",
        "champion_at_registration": str(previous_version),
        "promoted": str(promoted).lower(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    if promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, version)
        client.set_model_version_tag(
            registered_name, version, "promoted_over", str(previous_version)
        )
    client.set_terminated(run_id, status="FINISHED")
    before = "none" if previous_score is None else f"{previous_score:.4f}"
    decision = (
        f"version {version} ({model_name}) {primary_metric}={score:.4f} vs champion "
        f"{previous_version} {primary_metric}={before}: "
        + ("promoted to champion" if promoted else "not promoted")
    )
    create_markdown_artifact(
        markdown=f"# Promotion decision\n\n{decision}\n", description="promotion"
    )
    return {
        "version": version,
        "champion": promoted,
        "decision": decision,
        "model_uri": f"models:/{registered_name}/{version}",
        "lineage": json.dumps(lineage),
    }
