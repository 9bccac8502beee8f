"""The seqmodels pipeline as Prefect flows: one flow run per experiment, one task per stage.

pipeline -> one subflow per experiment -> one subflow per stage (flows/stages.py): download,
clean, vocab, train (models concurrently where the machine allows), evaluate-and-register.
No ML logic here: the tasks call seqmodels and log to MLflow; flows only wire them together.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.stages import (
    clean_stage,
    download_stage,
    evaluate_register_stage,
    train_stage_runner,
    vocab_stage,
)
from seqmodels.config import PipelineConfig, load_config
from seqmodels.data.sources import ResolvedCorpus
from seqmodels.evaluation.promotion import CHAMPION
from seqmodels.files import file_sha256
from tasks.data import report_corpus_update, workspace_id
from tasks.modeling import evaluate_lead_baseline
from tasks.tracking import (
    code_commit,
    experiment_id,
    flatten,
    log_params,
    mlflow_client,
)


@flow(name="seqmodels-experiment", flow_run_name="{experiment} ({config_path})")
def experiment_flow(
    config: PipelineConfig,
    experiment: str,
    config_path: str = "",
    refresh_cache: bool = False,
    force: bool = False,
) -> list[dict]:
    """Run one experiment of the (validated) config end to end; one summary row per model.
    `config_path` only names the run.

    When the last completed run of the experiment saw the same corpus version with the same
    config, there is nothing to train: the run says so (log line and Prefect artifact) and
    returns no rows, before cleaning. `force` (or `refresh_cache`) trains anyway."""
    exp = config.experiments[experiment]
    tracking_uri = config.resolved_tracking_uri()
    corpus = download_stage(
        experiment,
        exp.corpus,
        mirrors=config.resolved_mirrors(),
        cache_dir=str(config.work_dir.resolve() / "downloads"),
        workspace=workspace_id(config.work_dir.resolve()),
        refresh_cache=refresh_cache,
    )
    config_hash = config.fingerprint()
    previous = last_completed_run(tracking_uri, experiment)
    if not (force or refresh_cache):
        if previous is not None and _same_inputs(previous, corpus.version.digest, config_hash):
            report_nothing_to_train(experiment, previous, corpus.version.digest)
            return []
    data, spm_model = clean_and_vocab(config, experiment, corpus, refresh_cache=refresh_cache)
    previous_id = previous.info.run_id if previous is not None else None
    run = open_pipeline_run(
        config,
        experiment,
        data=data,
        spm_model=spm_model,
        corpus_version=corpus.version.digest,
        config_hash=config_hash,
        previous_run_id=previous_id,
    )
    client = mlflow_client(tracking_uri)
    try:
        rows = train_and_evaluate(
            config, experiment, run, data=data, spm_model=spm_model, refresh_cache=refresh_cache
        )
    except BaseException:
        client.set_terminated(run.parent_run_id, status="FAILED")
        raise
    client.set_terminated(run.parent_run_id, status="FINISHED")
    publish_summary(
        experiment,
        rows,
        primary_metric=exp.primary_metric,
        tracking_uri=tracking_uri,
        experiment_id=run.experiment_id,
        parent_run_id=run.parent_run_id,
    )
    return rows


@dataclass
class PipelineRun:
    """The MLflow parent run of one experiment's pipeline run, and the lineage it is tagged
    with (every model version registered under it carries the same tags)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    lineage: dict[str, str]


def train_and_evaluate(
    config: PipelineConfig,
    experiment: str,
    run: PipelineRun,
    *,
    data: dict[str, str],
    spm_model: str | None,
    refresh_cache: bool,
) -> list[dict]:
    """Train every model of the experiment under `run`, then evaluate, register and promote
    each; one summary row per model (plus the lead baseline of a summarisation experiment,
    scored like a model and never registered)."""
    exp = config.experiments[experiment]
    trained = train_stage_runner(experiment)(
        experiment,
        exp,
        parquet=data["parquet"],
        spm_model=spm_model,
        work_dir=str((config.work_dir / experiment).resolve()),
        tracking_uri=run.tracking_uri,
        experiment_id=run.experiment_id,
        parent_run_id=run.parent_run_id,
        workspace=workspace_id(config.work_dir.resolve()),
        refresh_cache=refresh_cache,
        corpus_version=data.get("corpus_version"),
    )
    rows = evaluate_register_stage(
        experiment,
        exp,
        trained=trained,
        parquet=data["parquet"],
        tracking_uri=run.tracking_uri,
        lineage=run.lineage,
    )
    if exp.evaluation.lead_words is not None:
        baseline = evaluate_lead_baseline(
            exp,
            data["parquet"],
            run.tracking_uri,
            run.experiment_id,
            run.parent_run_id,
            corpus_version=run.lineage["corpus_version"],
        )
        rows.append({"experiment": experiment, **baseline})
    return rows


def clean_and_vocab(
    config: PipelineConfig, experiment: str, corpus: ResolvedCorpus, *, refresh_cache: bool
) -> tuple[dict[str, str], str | None]:
    """The clean stage's outputs (Parquet, reports, corpus version) and the SentencePiece
    model the vocab stage trained on them (None where every model brings its tokenizer)."""
    exp = config.experiments[experiment]
    work_dir = str((config.work_dir / experiment).resolve())
    workspace = workspace_id(config.work_dir.resolve())
    data = clean_stage(
        experiment,
        corpus,
        clean=exp.clean,
        work_dir=work_dir,
        workspace=workspace,
        refresh_cache=refresh_cache,
    )
    if not exp.needs_sentencepiece:
        return data, None
    spm_model = vocab_stage(
        experiment,
        data["parquet"],
        columns=exp.text_columns,
        vocab=exp.vocab,
        work_dir=work_dir,
        workspace=workspace,
        refresh_cache=refresh_cache,
    )
    return data, spm_model


def publish_summary(
    experiment: str,
    rows: list[dict],
    *,
    primary_metric: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
) -> None:
    """Mark the champion among `rows` and publish them as the run's Prefect artifact.
    "Champion" is decided after all models: a model promoted early may be beaten later."""
    client = mlflow_client(tracking_uri)
    champion = str(client.get_model_version_by_alias(experiment, CHAMPION).version)
    for row in rows:
        row["champion"] = row["version"] == champion
    create_markdown_artifact(
        key=f"{experiment}-summary".replace("_", "-"),
        markdown=summary_markdown(
            rows, primary_metric, parent_run_id, _run_link(tracking_uri, experiment_id)
        ),
        description=f"{experiment}: models and metrics",
    )


def open_pipeline_run(
    config: PipelineConfig,
    experiment: str,
    *,
    data: dict[str, str],
    spm_model: str | None,
    corpus_version: str,
    config_hash: str,
    previous_run_id: str | None,
) -> PipelineRun:
    """Start the experiment's MLflow parent run (tag stage=pipeline) with its lineage tags,
    params, the data report, what the corpus version changed against `previous_run_id`
    (the last completed run; None: everything is new), the vocab and the resolved config.
    The caller ends the run (set_terminated) when the experiment finishes or fails."""
    exp = config.experiments[experiment]
    tracking_uri = config.resolved_tracking_uri()
    client = mlflow_client(tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri)
    lineage = {
        "code_commit": code_commit(),
        "data_sha256": file_sha256(data["parquet"]),
        "config_hash": config_hash,
        "corpus_version": corpus_version,
        "prefect_flow_run_id": str(flow_run.get_id()),
    }
    if spm_model is not None:
        lineage["vocab_sha256"] = file_sha256(spm_model)
    parent = client.create_run(
        exp_id,
        run_name=flow_run.get_name(),  # "<experiment> (<config>)"
        tags={**lineage, "stage": "pipeline"},
    )
    parent_id = parent.info.run_id
    log_params(client, parent_id, flatten("", exp.model_dump(mode="json")))
    for name in ("report_json", "report_md", "corpus_version"):
        client.log_artifact(parent_id, data[name], "data")
    report_corpus_update(tracking_uri, previous_run_id, parent_id, data, exp.text_columns)
    if spm_model is not None:
        client.log_artifact(parent_id, spm_model, "vocab")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.json"
        resolved.write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        client.log_artifact(parent_id, str(resolved))
    return PipelineRun(tracking_uri, exp_id, parent_id, lineage)


def last_completed_run(tracking_uri: str, experiment: str):
    """The newest parent run (tag stage=pipeline) of `experiment` that finished, or None."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        "tags.stage = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _same_inputs(run, corpus_version: str, config_hash: str) -> bool:
    """Nothing new since `run`: same corpus version AND same config. A changed config (a new
    model, other settings) must still train on the same data, hence both."""
    tags = run.data.tags
    return tags.get("corpus_version") == corpus_version and tags.get("config_hash") == config_hash


def report_nothing_to_train(experiment: str, run, corpus_version: str) -> str:
    """One log line and a Prefect artifact saying that this run trains nothing."""
    line = (
        f"{experiment}: no new data since run {run.info.run_id} "
        f"(corpus version {corpus_version}): nothing to train"
    )
    get_run_logger().info(line)
    create_markdown_artifact(
        key=f"{experiment}-summary".replace("_", "-"),
        markdown=f"{line}.\n\nRun with `--force` (flow parameter `force`) to train anyway.\n",
        description=f"{experiment}: no new data",
    )
    return line


def _run_link(tracking_uri: str, exp_id: str):
    """Markdown link to an MLflow run when the tracking store is a server, else the bare id."""
    if not tracking_uri.startswith("http"):
        return lambda run_id: f"`{run_id}`"
    base = tracking_uri.rstrip("/")
    return lambda run_id: f"[{run_id[:8]}]({base}/#/experiments/{exp_id}/runs/{run_id})"


def summary_markdown(
    rows: list[dict], primary_metric: str, parent_run_id: str = "", link=lambda r: f"`{r}`"
) -> str:
    lines = [
        f"MLflow parent run {link(parent_run_id)}.",
        "",
        f"| model | {primary_metric} | version | champion | MLflow run |",
        "|---|---:|---:|:-:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['metrics'][primary_metric]:.4f} | {r['version'] or 'baseline'} | "
            f"{'yes' if r['champion'] else ''} | {link(r['run_id'])} |"
        )
    return "\n".join(lines) + "\n"


@flow(name="seqmodels-pipeline", flow_run_name="pipeline-{config_path}")
def pipeline_flow(
    config_path: str,
    experiments: list[str] | None = None,
    refresh_cache: bool = False,
    config: PipelineConfig | None = None,
    force: bool = False,
) -> list[dict]:
    """Every experiment of the config (or the named ones), one subflow each.

    An experiment with no new data since its last completed run (same corpus version, same
    config) trains nothing unless `force` (see experiment_flow).

    The config is read and validated once, here, unless the caller already did (the CLI
    passes `config` so that a bad file fails before Prefect starts); the subflows get the
    validated value, not the path."""
    if config is None:
        config = load_config(config_path, experiments)
    rows: list[dict] = []
    for name in config.experiments:
        # Each experiment sees only its own part, as when run alone (`-e NAME`): its
        # config_hash and config.json do not change when another experiment does.
        own = config.model_copy(update={"experiments": {name: config.experiments[name]}})
        rows += experiment_flow(own, name, config_path, refresh_cache, force)
    return rows
