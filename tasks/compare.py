"""Compare every registered version of a model: the Prefect task around
seqmodels.evaluation.comparison.

This module reads the registry into plain version records and logs what the library writes.
The report goes to an MLflow run of its own (tag stage=compare) in the experiment of the same
name: it covers versions from many pipeline runs, so attaching it to one of their parent runs
would misplace it, and a run per comparison keeps a history of what was compared when.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from mlflow import MlflowClient
from prefect import task

from seqmodels.evaluation.comparison import (
    BASELINE,
    CURVES,
    VersionRecord,
    build_comparison,
    table_columns,
    write_report,
)
from tasks.tracking import experiment_id, mlflow_client


def _last_logged(client: MlflowClient, run_id: str, key: str) -> float | None:
    """The value logged last. Unlike run.data.metrics (the highest step), this is the run summary
    for keys that are also logged per step, such as tokens_per_s."""
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: (m.timestamp, m.step)).value if history else None


def version_records(client: MlflowClient, name: str) -> list[VersionRecord]:
    """Every version of registered model `name` with its run's metrics, tags and loss curves,
    as plain records for seqmodels.evaluation.comparison.build_comparison.

    Raises MlflowException when the registered model does not exist.
    """
    model = client.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    escaped = name.replace("'", "\\'")
    records: list[VersionRecord] = []
    for v in client.search_model_versions(f"name='{escaped}'"):
        run = client.get_run(v.run_id)
        metrics = dict(run.data.metrics)
        if "tokens_per_s" in metrics:  # logged per step and once more as the run's summary
            metrics["tokens_per_s"] = _last_logged(client, v.run_id, "tokens_per_s")
        history = {
            key: [(m.step, m.value) for m in client.get_metric_history(v.run_id, key)]
            for key in CURVES
        }
        records.append(
            {
                "version": str(v.version),
                "run_id": v.run_id,
                "run_name": run.info.run_name,
                "version_tags": dict(v.tags),
                "run_tags": dict(run.data.tags),
                "aliases": aliases.get(str(v.version), []),
                "metrics": metrics,
                "history": history,
            }
        )
    return records


def baseline_records(client: MlflowClient, name: str) -> list[VersionRecord]:
    """The newest run of each baseline (tag stage=baseline, e.g. the lead-N summariser) in
    experiment `name`, as records of version "baseline": listed beside the versions."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.stage = 'baseline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    newest: dict[str, VersionRecord] = {}
    for run in runs:
        newest.setdefault(
            run.info.run_name,
            {
                "version": BASELINE,
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "run_tags": dict(run.data.tags),
                "metrics": dict(run.data.metrics),
            },
        )
    return list(newest.values())


@task(name="compare-versions", timeout_seconds=1800)
def compare_versions(
    name: str, tracking_uri: str, out_dir: str, primary_metric: str | None = None
) -> dict:
    """Collect, report and log the comparison of registered model `name`.

    Returns the table (header, cells), the report's Markdown, the files written and the id of
    the MLflow run (tag stage=compare) that holds them as artifacts under `comparison/`.
    """
    client = mlflow_client(tracking_uri)
    records = version_records(client, name) + baseline_records(client, name)
    comparison = build_comparison(name, records, primary_metric)
    files = write_report(comparison, Path(out_dir), tracking_uri)
    exp_id = experiment_id(client, name, tracking_uri)
    run = client.create_run(
        exp_id,
        run_name=f"compare-{dt.datetime.now():%Y%m%d-%H%M%S}",
        tags={"stage": "compare", "registered_model": name},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "primary_metric", str(comparison["primary_metric"]))
    client.log_param(run_id, "versions", ",".join(r["version"] for r in comparison["rows"]))
    for path in files.values():
        client.log_artifact(run_id, str(path), "comparison")
    client.set_terminated(run_id, status="FINISHED")
    header, cells = table_columns(comparison)
    return {
        "header": header,
        "cells": cells,
        "primary_metric": comparison["primary_metric"],
        "markdown": files["report"].read_text(encoding="utf-8"),
        "files": {k: str(p) for k, p in files.items()},
        "run_id": run_id,
    }
