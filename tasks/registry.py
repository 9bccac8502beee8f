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
from seqmodels.models.folder import NATURAL_TASKS, transformers_export
from tasks.tracking import mlflow_client

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# The pyfunc needs these at load time; listing them saves MLflow ~5 s of inference per model.
PIP_REQUIREMENTS = ["torch", "numpy", "sentencepiece", "pyarrow", "pandas"]
# The transformers flavor's own guess imports every optional backend (torchvision...).
TRANSFORMERS_REQUIREMENTS = ["transformers<5", "torch", "tokenizers", "sentencepiece"]
INPUT_EXAMPLES = {
    "translation": "Ein Mann fährt Fahrrad.",
    "summarization": "The meeting moved to Thursday at 10am; please send your slides by Wednesday.",
}
METADATA_KEY = "seqmodels"  # the model's seqmodels.json, logged with a transformers model


def _transformers_signature(hf_task: str) -> ModelSignature:
    """Strings in, strings out; the generation settings a caller may change per request
    (they go to the pipeline's call, so only its own keyword arguments)."""
    strings = Schema([ColSpec("string")])
    if hf_task == "fill-mask":  # the best token for each [MASK]: nothing to set
        return ModelSignature(inputs=strings, outputs=strings)
    params = [ParamSpec("max_new_tokens", "long", 60)]
    if hf_task == "text-generation":
        params += [
            ParamSpec("do_sample", "boolean", True),
            ParamSpec("temperature", "double", 0.8),
            ParamSpec("top_k", "long", 50),
        ]
    return ModelSignature(inputs=strings, outputs=strings, params=ParamSchema(params))


def _signature(task_kind: str) -> ModelSignature:
    default = NATURAL_TASKS.get(task_kind, "generate")
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
    *,
    trained: dict,
    task_kind: str,
    tracking_uri: str,
    lineage: dict[str, str],
    parquet: str,
) -> dict:
    """Log the model (the seqmodels pyfunc, or MLflow's transformers flavor for a fine-tuned
    Hugging Face model) and register it as a new version with its lineage tags."""
    client = mlflow_client(tracking_uri)
    run_id = trained["run_id"]
    existing = client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
    if existing:  # a re-run with a cached training: the version is already there
        version = str(existing[0].version)
        return {"version": version, "model_uri": f"models:/{registered_name}/{version}"}
    # The dataset's digest is the corpus version (what files it was cleaned from) when known.
    digest = lineage.get("corpus_version") or lineage.get("data_sha256", "")
    _log_dataset_input(client, run_id, parquet, digest)
    example = [INPUT_EXAMPLES.get(task_kind, "ROMEO:")]
    exported = transformers_export(Path(trained["model_dir"]))
    with mlflow.start_run(run_id=run_id):
        if exported is not None:
            info = _log_transformers_model(exported, example, registered_name)
        else:
            info = log_pyfunc_model(trained["model_dir"], task_kind, example, registered_name)
    version = str(info.registered_model_version)
    get_transaction().set("registered", (tracking_uri, registered_name, version))
    for key, value in {**lineage, "model_name": model_name, "mlflow_run_id": run_id}.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return {"version": version, "model_uri": f"models:/{registered_name}/{version}"}


def log_pyfunc_model(
    model_dir: str,
    task_kind: str,
    example: list[str],
    registered_name: str,
    requirements: tuple[str, ...] = (),
):
    """The seqmodels pyfunc (tasks/pyfunc_model.py) with the model folder as its artifact;
    `requirements`: packages the folder needs beside PIP_REQUIREMENTS (its runtime's)."""
    # The logged model needs the weights, config and vocabulary, not the training state:
    # checkpoints (optimizer state included) would triple its size.
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) / "model_dir"
        ignore = shutil.ignore_patterns("checkpoints", "evaluation")
        shutil.copytree(model_dir, folder, ignore=ignore)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model_dir": str(folder)},
            code_paths=[str(Path(seqmodels.__file__).parent)],
            pip_requirements=[*PIP_REQUIREMENTS, *requirements],
            signature=_signature(task_kind),
            input_example=example,
            registered_model_name=registered_name,
        )


def _log_transformers_model(exported, example: list[str], registered_name: str):
    """A fine-tuned Hugging Face model with MLflow's transformers flavor: loads back as a
    Hugging Face pipeline (mlflow.transformers.load_model) and serves as a pyfunc. The
    seqmodels metadata lets `seqmodels translate|generate|score` rebuild its predictor."""
    hf_task, pipeline, meta = exported
    if hf_task == "fill-mask":  # a masked LM is asked to fill in a masked token
        example = [f"{example[0]} {pipeline.tokenizer.mask_token}"]
    return mlflow.transformers.log_model(
        pipeline,
        name="model",
        task=hf_task,
        signature=_transformers_signature(hf_task),
        input_example=example,
        pip_requirements=TRANSFORMERS_REQUIREMENTS,
        metadata={METADATA_KEY: meta},
        registered_model_name=registered_name,
    )


def exported_folder(local: Path, flavor: dict) -> Path:
    """One save_pretrained folder (links to the model's and its tokenizer's files) from a
    downloaded transformers-flavor model, which keeps them apart (model/, components/...)."""
    merged = Path(local) / "pretrained"
    merged.mkdir(exist_ok=True)
    parts = [flavor.get("model_binary", "model")]
    parts += [f"components/{name}" for name in flavor.get("components", [])]
    for part in parts:
        for path in (Path(local) / part).iterdir():
            link = merged / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return merged


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
