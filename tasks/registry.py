"""Prefect task that logs a trained model as an MLflow pyfunc and registers it, with lineage.

Promotion (aliases) is tasks/promotion.py; both run in one Prefect transaction.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task
from prefect.transactions import get_transaction

import seqmodels
from tasks.tracking import mlflow_client

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
                ParamSpec("top_k", "long", 0),  # 0: no top-k filtering
                ParamSpec("seed", "long", -1),  # -1: a random seed
            ]
        ),
    )


def _log_dataset_input(client: mlflow.MlflowClient, run_id: str, parquet: str, digest: str):
    """Record the cleaned Parquet as the run's input through the MLflow dataset API."""
    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    columns = pq.read_schema(parquet)
    schema = Schema(
        [ColSpec("long" if str(f.type) == "int64" else "string", f.name) for f in columns]
    )
    # A local path matches MLflow's local-file source twice (for "" and "file:"), which makes
    # resolve_dataset_source warn; the source is known, so it is built directly.
    found = [s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"]
    if found:
        source = found[0](Path(parquet).resolve().as_uri())
    else:  # another MLflow: let it resolve the path (it may warn)
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        source = resolve_dataset_source(parquet)
    dataset = MetaDataset(source, Path(parquet).parent.name, digest[:16], schema)
    context = InputTag(key="mlflow.data.context", value="train+valid+test")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])])


@task(name="register", timeout_seconds=1800)
def register_model_version(
    registered_name: str,
    model_name: str,
    trained: dict,
    task_kind: str,
    tracking_uri: str,
    lineage: dict[str, str],
    parquet: str,
) -> dict:
    """Log the model as a pyfunc and register it as a new version with its lineage tags."""
    client = mlflow_client(tracking_uri)
    run_id = trained["run_id"]
    existing = client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
    if existing:  # a re-run with a cached training: the version is already there
        version = str(existing[0].version)
        return {"version": version, "model_uri": f"models:/{registered_name}/{version}"}
    _log_dataset_input(client, run_id, parquet, lineage.get("data_sha256", ""))
    example = ["Ein Mann fährt Fahrrad."] if task_kind == "translation" else ["ROMEO:"]
    # The logged model needs the weights, config and vocabulary, not the training state:
    # checkpoints (optimizer state included) would triple its size.
    staging = tempfile.TemporaryDirectory()
    model_dir = Path(staging.name) / "model_dir"
    shutil.copytree(
        trained["model_dir"], model_dir, ignore=shutil.ignore_patterns("checkpoints", "evaluation")
    )
    with staging, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(Path(seqmodels.__file__).parent)],
            pip_requirements=PIP_REQUIREMENTS,
            signature=_signature(task_kind),
            input_example=example,
            registered_model_name=registered_name,
        )
    version = str(info.registered_model_version)
    get_transaction().set("registered", (tracking_uri, registered_name, version))
    for key, value in {**lineage, "model_name": model_name, "mlflow_run_id": run_id}.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return {"version": version, "model_uri": f"models:/{registered_name}/{version}"}


@register_model_version.on_rollback
def _delete_half_registered_version(transaction) -> None:
    """A version whose evaluation or promotion failed is removed, not left half-registered."""
    registered = transaction.get("registered", None)
    if registered is None:
        return
    tracking_uri, name, version = registered
    try:
        mlflow_client(tracking_uri).delete_model_version(name, version)
    except MlflowException:
        pass
