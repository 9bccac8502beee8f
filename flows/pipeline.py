"""The seqmodels pipeline as Prefect flows: one flow run per experiment, one task per stage.

download -> clean -> vocab -> (train -> evaluate -> register) per model. No ML logic here: the
tasks call seqmodels and log to MLflow; this file only wires them together.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.transactions import transaction

from seqmodels.config import load_config
from tasks.data import clean_corpus_files, download_corpus_file, train_vocabulary, workspace_id
from tasks.modeling import evaluate_model_run, train_model_run
from tasks.promotion import CHAMPION, promote_if_better
from tasks.registry import register_model_version
from tasks.tracking import (
    code_commit,
    experiment_id,
    file_digest,
    flatten,
    log_params,
    mlflow_client,
)


@flow(name="seqmodels-experiment", flow_run_name="{experiment}")
def experiment_flow(config_path: str, experiment: str, refresh_cache: bool = False) -> list[dict]:
    """Run one experiment of the config end to end; returns one summary row per model."""
    logger = get_run_logger()
    config = load_config(config_path, [experiment])
    exp = config.experiments[experiment]
    work_dir = (config.work_dir / experiment).resolve()
    workspace = workspace_id(config.work_dir.resolve())
    tracking_uri = config.resolved_tracking_uri()
    mirrors = config.resolved_mirrors()

    download = download_corpus_file.with_options(refresh_cache=refresh_cache)
    cache_dir = str(config.work_dir.resolve() / "downloads")
    raw_paths = [download(f, mirrors, cache_dir, workspace) for f in exp.corpus.files]
    data = clean_corpus_files.with_options(refresh_cache=refresh_cache)(
        raw_paths, exp.corpus, exp.clean, str(work_dir), workspace
    )
    columns = ["src", "tgt"] if exp.task == "translation" else ["text"]
    spm_model = train_vocabulary.with_options(refresh_cache=refresh_cache)(
        data["parquet"], columns, exp.vocab, str(work_dir), workspace
    )

    client = mlflow_client(tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri)
    lineage = {
        "code_commit": code_commit(),
        "data_sha256": file_digest(data["parquet"]),
        "vocab_sha256": file_digest(spm_model),
        "config_hash": config.fingerprint(),
        "prefect_flow_run_id": str(flow_run.get_id()),
    }
    parent = client.create_run(
        exp_id,
        run_name=f"{experiment}-{flow_run.get_name()}",
        tags={**lineage, "stage": "pipeline"},
    )
    parent_id = parent.info.run_id
    log_params(client, parent_id, flatten("", exp.model_dump(mode="json")))
    client.log_artifact(parent_id, data["report_json"], "data")
    client.log_artifact(parent_id, data["report_md"], "data")
    client.log_artifact(parent_id, spm_model, "vocab")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.json"
        resolved.write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        client.log_artifact(parent_id, str(resolved))

    rows = []
    try:
        for model_name, spec in exp.models.items():
            trained = train_model_run(
                model_name,
                spec,
                exp,
                data["parquet"],
                spm_model,
                str(work_dir),
                tracking_uri,
                exp_id,
                parent_id,
            )
            # Evaluation, registration and promotion succeed or fail together: a failure
            # rolls back the aliases and deletes the half-registered version.
            with transaction():
                evaluated = evaluate_model_run(
                    model_name, trained, exp, data["parquet"], tracking_uri
                )
                registered = register_model_version(
                    experiment,
                    model_name,
                    trained,
                    exp.task,
                    tracking_uri,
                    {**lineage, "model_type": spec.type},
                    data["parquet"],
                )
                promotion = promote_if_better(
                    experiment,
                    registered["version"],
                    model_name,
                    trained["run_id"],
                    evaluated["outputs_path"],
                    exp,
                    data["parquet"],
                    tracking_uri,
                )
            client.set_terminated(trained["run_id"], status="FINISHED")
            metrics = evaluated["metrics"]
            logger.info(promotion["decision"])
            rows.append(
                {
                    "experiment": experiment,
                    "model": model_name,
                    "run_id": trained["run_id"],
                    "version": registered["version"],
                    "metrics": metrics,
                }
            )
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")

    # "Champion" is decided after all models: a model promoted early may be beaten later.
    champion = str(client.get_model_version_by_alias(experiment, CHAMPION).version)
    for row in rows:
        row["champion"] = row["version"] == champion
    create_markdown_artifact(
        key=f"{experiment}-summary".replace("_", "-"),
        markdown=summary_markdown(rows, exp.primary_metric),
        description=f"{experiment}: models and metrics",
    )
    return rows


def summary_markdown(rows: list[dict], primary_metric: str) -> str:
    lines = [
        f"| model | {primary_metric} | version | champion | MLflow run |",
        "|---|---:|---:|:-:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['metrics'][primary_metric]:.4f} | {r['version']} | "
            f"{'yes' if r['champion'] else ''} | {r['run_id']} |"
        )
    return "\n".join(lines) + "\n"


@flow(name="seqmodels-pipeline", flow_run_name="pipeline-{config_path}")
def pipeline_flow(
    config_path: str, experiments: list[str] | None = None, refresh_cache: bool = False
) -> list[dict]:
    """Every experiment of the config (or the named ones), one subflow each."""
    config = load_config(config_path, experiments)
    rows: list[dict] = []
    for name in config.experiments:
        rows += experiment_flow(config_path, name, refresh_cache)
    return rows
