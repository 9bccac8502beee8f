"""Export of a registered model for fast inference: `seqmodels export`.

The exported folder (seqmodels.models.ct2_export) is registered as a new version of the same
registered model, logged in a run of its own (so the parent's run keeps naming only the
parent's version), tagged format, quantization and parent_version. It takes no alias: it is a
packaging of the version it came from, not a challenger, and promotion
(tasks/promotion.py) only ever judges versions the pipeline trains.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from seqmodels.models.ct2_export import RUNTIME, export_ctranslate2
from seqmodels.models.folder import read_model_meta
from tasks.modeling import fetch_model_folder, pin_model_uri
from tasks.registry import INPUT_EXAMPLES, log_pyfunc_model
from tasks.tracking import mlflow_client

FORMATS = (RUNTIME,)


def export_registered_model(
    model_uri: str, quantization: str, out_dir: Path, tracking_uri: str
) -> dict[str, str]:
    """Export `model_uri` (models:/NAME@ALIAS or models:/NAME/N) to CTranslate2 into out_dir
    and register it; returns the new version and its URI. ValueError: nothing to export
    there, or a model CTranslate2 cannot hold."""
    client = mlflow_client(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if not model_uri.startswith("models:/") or not ("@" in model_uri or "/" in model_uri[8:]):
        raise ValueError(f"{model_uri}: name a registered version, models:/NAME@ALIAS or /N")
    pinned = pin_model_uri(client, model_uri, "")
    name, parent = pinned[len("models:/") :].rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = fetch_model_folder(pinned, Path(tmp))
        exported = export_ctranslate2(folder, Path(out_dir), quantization)
    task_kind = read_model_meta(exported).get("task", "")
    parent_version = client.get_model_version(name, parent)
    parent_run = client.get_run(parent_version.run_id)
    with mlflow.start_run(
        experiment_id=parent_run.info.experiment_id,
        run_name=f"{name}-v{parent}-{RUNTIME}-{quantization}",
    ) as run:
        info = log_pyfunc_model(
            str(exported),
            task_kind,
            [INPUT_EXAMPLES.get(task_kind, "ROMEO:")],
            name,
            requirements=("ctranslate2>=4",),
        )
    version = str(info.registered_model_version)
    inherited = ("model_name", "model_type", "corpus_version")  # what `compare` shows of it
    tags = {
        **{key: parent_version.tags[key] for key in inherited if key in parent_version.tags},
        "format": RUNTIME,
        "quantization": quantization,
        "parent_version": parent,
        "mlflow_run_id": run.info.run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return {"version": version, "model_uri": f"models:/{name}/{version}"}
