"""Prefect tasks that train and evaluate one model, tracked as an MLflow child run."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from seqmodels.config import ExperimentConfig, ModelSpec, without_distributed
from seqmodels.data.replay import continuation_parquet
from seqmodels.data.sources import CorpusVersion, read_corpus_version
from seqmodels.evaluation.promotion import CHAMPION
from seqmodels.evaluation.scoring import (
    EvaluationResult,
    LeadBaseline,
    evaluate_model,
    evaluate_predictor,
    metrics_markdown,
    outputs_record,
)
from seqmodels.files import atomic_write_text, file_sha256, json_digest
from seqmodels.models.folder import folder_from_export, model_lineage
from seqmodels.training.distributed import WorkerFailed
from seqmodels.training.progress import TrainingProgress
from seqmodels.training.settings import DistributedSettings
from tasks.data import logged_corpus_version
from tasks.launch import TrainRequest, launch_training, train_request
from tasks.registry import METADATA_KEY, exported_folder
from tasks.tracking import MetricLogger, flatten, log_params, mlflow_client


def training_dir(
    work_dir: str, model_name: str, spec: ModelSpec, parquet: str, spm: str | None
) -> Path:
    """The same model on the same data always trains in the same folder, so a retry or the
    next run after a crash resumes from its last checkpoint instead of starting over."""
    # Only what the config sets: a new setting with a default must not rename every folder
    # (and so lose every resume point). The trainer's own resume key has all settings.
    settings = without_distributed(spec).model_dump(mode="json", exclude_defaults=True)
    key = json_digest(model_name, settings, parquet, spm, length=12)
    return Path(work_dir) / "models" / f"{model_name}-{key}"


def _child_run(client, experiment_id: str, *, parent_run_id: str, model_name: str, spec, out_dir):
    """An unfinished MLflow run for this training folder (a crashed attempt), or a new one."""
    found = client.search_runs(
        [experiment_id],
        f"tags.training_dir = '{out_dir}' and attributes.status != 'FINISHED'",
        max_results=1,
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    run = client.create_run(
        experiment_id,
        run_name=model_name,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "model_type": spec.type,
            "stage": "train",
            "training_dir": str(out_dir),
        },
    )
    return run.info.run_id, False


def pin_model_uri(client, uri: str, registered_name: str) -> str:
    """`uri` with an alias or a bare version number resolved to one registered version
    (models:/NAME/N), so a cached or resumed training never mixes two parents; runs:/ URIs
    are returned as they are. ValueError naming the URI when nothing is there."""
    if uri.isdigit():  # a version of this experiment's registered model
        uri = f"models:/{registered_name}/{uri}"
    if not uri.startswith("models:/"):
        return uri
    name, alias, version = uri[len("models:/") :], None, None
    if "@" in name:
        name, alias = name.split("@", 1)
    elif "/" in name:
        name, version = name.rsplit("/", 1)
    else:
        raise ValueError(
            f"init_from {uri}: name a version (models:/NAME/3) or an alias (@champion)"
        )
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            version = client.get_model_version(name, version).version
    except MlflowException as exc:
        raise ValueError(f"init_from {uri}: no such registered version ({exc.message})") from None
    return f"models:/{name}/{version}"


def fetch_model_folder(uri: str, dst: Path) -> Path:
    """The seqmodels model folder of a registered version or run (downloaded; rebuilt from the
    pipeline's files for a model logged with the transformers flavor)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    folder = local / "artifacts" / "model_dir"
    if folder.is_dir():
        return folder
    logged = Model.load(str(local))
    meta = (logged.metadata or {}).get(METADATA_KEY)
    if "transformers" in logged.flavors and meta is not None:
        pretrained = exported_folder(local, logged.flavors["transformers"])
        return folder_from_export(pretrained, meta, Path(dst) / "model_dir")
    raise ValueError(f"init_from {uri}: not a seqmodels model (no artifacts/model_dir)")


@task(name="pin-init-from", timeout_seconds=300)
def pin_init_from(uri: str, registered_name: str, tracking_uri: str) -> str:
    """The warm-start source of a model pinned to one version, before its training is keyed."""
    pinned = pin_model_uri(mlflow_client(tracking_uri), uri, registered_name)
    get_run_logger().info("init_from %s -> %s", uri, pinned)
    return pinned


def continued_spec(spec: ModelSpec) -> ModelSpec:
    """The spec a continuation of the champion trains with: continue_steps steps."""
    steps = spec.training.continue_steps
    if steps is None:
        return spec
    training = spec.training.model_copy(
        update={"max_steps": steps, "warmup_steps": min(spec.training.warmup_steps, steps)}
    )
    return spec.model_copy(update={"training": training})


def _parent_corpus_version(client, run_id: str) -> CorpusVersion | None:
    """The corpus version the pipeline run that trained `run_id` saw (its parent run's
    data/corpus_version.json), or None when it did not record one."""
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    return logged_corpus_version(client, parent) if parent else None


@task(name="champion-start", timeout_seconds=1800)
def champion_start(
    registered_name: str,
    model_name: str,
    *,
    spec: ModelSpec,
    parquet: str,
    corpus_version: str | None,
    work_dir: str,
    tracking_uri: str,
) -> dict | None:
    """Where a `train_from: champion` model starts: the champion pinned to its version, its
    SentencePiece model (kept frozen: a warm start needs the same vocabulary) and the rows to
    train on (files new since the champion's corpus version + replay_fraction of the older
    train rows, see seqmodels.data.replay). None (train from scratch as configured) when there
    is no champion yet, or when the champion is a version of another model of the experiment.
    `corpus_version`: this run's corpus_version.json."""
    logger = get_run_logger()
    client = mlflow_client(tracking_uri)
    try:
        champion = client.get_model_version_by_alias(registered_name, CHAMPION)
    except MlflowException:
        logger.info("%s: no champion of %s yet: training from scratch", model_name, registered_name)
        return None
    if (
        champion.tags.get("model_name") != model_name
        or champion.tags.get("model_type") != spec.type
    ):
        logger.warning(
            "%s: the champion of %s is version %s, a %s model (%s): training from scratch",
            model_name,
            registered_name,
            champion.version,
            champion.tags.get("model_type"),
            champion.tags.get("model_name"),
        )
        return None
    uri = f"models:/{registered_name}/{champion.version}"
    folder = fetch_model_folder(uri, Path(work_dir) / "champions" / f"v{champion.version}")
    spm = folder / "spm.model"
    previous = _parent_corpus_version(client, champion.run_id)
    new_files = None
    if previous is not None and corpus_version is not None:
        added = read_corpus_version(corpus_version).changes_since(previous).added
        new_files = sorted({f.url for f in added})
    counts: dict[str, int] = {}
    train_parquet = Path(parquet)
    if new_files is not None:  # unknown: the champion's version was not recorded, keep all
        train_parquet, counts = continuation_parquet(
            parquet, new_files, spec.training.replay_fraction, Path(work_dir) / "continue"
        )
    logger.info(
        "%s: continuing %s (corpus version %s) for %s steps on %s",
        model_name,
        uri,
        champion.tags.get("corpus_version"),
        continued_spec(spec).training.max_steps,
        counts or "every train row (the champion's corpus version is not recorded)",
    )
    lineage = {"train_from": "champion"}
    if champion.tags.get("corpus_version"):
        lineage["champion_corpus_version"] = champion.tags["corpus_version"]
    if spm.is_file():
        lineage["vocab_sha256"] = file_sha256(spm)
    return {
        "init_from": uri,
        "spm_model": str(spm) if spm.is_file() else None,
        "parquet": str(train_parquet),
        "lineage": lineage,
        "counts": counts,
    }


def run_training(
    request: TrainRequest, progress: TrainingProgress, distributed: DistributedSettings | None
) -> dict:
    """The request trained in this process (`distributed` None), or by a launch's workers."""
    if distributed is not None:
        get_run_logger().info(
            "%s: launching %d x %d worker processes",
            request.model_name,
            distributed.nnodes,
            distributed.nproc_per_node,
        )
        return launch_training(request, distributed)
    on_metrics = MetricLogger(mlflow_client(request.tracking_uri), request.run_id)
    return train_request(request, on_metrics, progress)


# Errors a retry would meet again: a bad config, a missing file.
PERMANENT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)


def _worth_retrying(task, task_run, state) -> bool:
    """A crash of the process or device may pass (the retry resumes from the last checkpoint);
    a bad config or missing file will not, in this process or in a launch's worker."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except WorkerFailed as exc:
        return exc.exception not in {error.__name__ for error in PERMANENT_ERRORS}
    except Exception:
        return True
    return False


@task(
    name="train",
    timeout_seconds=6 * 3600,
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=_worth_retrying,
    # Unchanged model, data and vocabulary: the trained model is reused (a new parent run, or
    # the number of processes it trains on, does not count as a change). refresh_cache
    # retrains from scratch.
    cache_policy=(INPUTS - "parent_run_id" - "distributed") + TASK_SOURCE,
    persist_result=True,
)
def train_model_run(
    model_name: str,
    spec: ModelSpec,
    *,
    task_kind: str,
    decoding: dict,
    parquet: str,
    spm_model: str | None,
    work_dir: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    workspace: str,
    from_scratch: bool = False,
    init_from: str | None = None,
    extra_lineage: dict[str, str] | None = None,
    distributed: DistributedSettings | None = None,
) -> dict:
    """Train `model_name` in an MLflow child run; returns its run id and model folder.
    `spm_model`: the experiment's vocabulary (None when every model brings its own
    tokenizer); `init_from`: a pinned registry or run URI whose weights training starts from;
    `extra_lineage`: more tags for the run and the registered version; `distributed`: train
    on that many worker processes (the spec's own training.distributed is ignored: the
    stage passes it here, out of the cache key)."""
    client = mlflow_client(tracking_uri)
    out_dir = training_dir(work_dir, model_name, spec, parquet, spm_model)
    if init_from is not None:  # the pinned parent is part of the folder's identity
        out_dir = out_dir.with_name(f"{out_dir.name}-{json_digest(init_from, length=8)}")
    if from_scratch and out_dir.exists():
        shutil.rmtree(out_dir)
    run_id, resumed = _child_run(
        client,
        experiment_id,
        parent_run_id=parent_run_id,
        model_name=model_name,
        spec=spec,
        out_dir=out_dir,
    )
    if resumed:
        get_run_logger().warning("%s: resuming run %s in %s", model_name, run_id, out_dir)
    else:
        log_params(client, run_id, flatten("", {"model": spec.model_dump()}))
    lineage = training_lineage(spec, init_from, extra_lineage)
    for key, value in lineage.items():
        client.set_tag(run_id, key, value)
    if distributed is not None:  # a tag, not a param: a resumed run may use other numbers
        client.set_tag(run_id, "distributed", f"{distributed.nnodes}x{distributed.nproc_per_node}")
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            TrainingProgress(model_name, get_run_logger()) as progress,
        ):
            # Ranks on other nodes read the parent's weights too: then it goes to the shared
            # work_dir, next to the training folder, instead of this pod's temp folder.
            several_nodes = distributed is not None and distributed.nnodes > 1
            fetch_to = out_dir.with_name(f"{out_dir.name}-parent") if several_nodes else tmp
            parent = fetch_model_folder(init_from, Path(fetch_to)) if init_from else None
            request = TrainRequest(
                model_name=model_name,
                spec=without_distributed(spec).model_dump(mode="json"),
                task_kind=task_kind,
                decoding=decoding,
                parquet=parquet,
                spm_model=spm_model,
                out_dir=str(out_dir),
                tracking_uri=tracking_uri,
                run_id=run_id,
                init_from=str(parent) if parent else None,
            )
            summary = run_training(request, progress, distributed)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    for key, value in summary.items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, key, float(value))
        else:
            client.set_tag(run_id, key, str(value))
    return {"run_id": run_id, "model_dir": str(out_dir), "summary": summary, "lineage": lineage}


def training_lineage(
    spec: ModelSpec, init_from: str | None, extra_lineage: dict[str, str] | None
) -> dict[str, str]:
    """The tags a training run and its registered version carry: the model's own lineage,
    the caller's extra tags, and where the weights started (`init_from`; `parent_version`
    when that is a registered version)."""
    lineage = {**model_lineage(spec), **(extra_lineage or {})}
    if init_from is not None:
        lineage["init_from"] = init_from
    if init_from is not None and init_from.startswith("models:/"):
        lineage["parent_version"] = init_from.rsplit("/", 1)[1]
    return lineage


@task(
    name="evaluate",
    timeout_seconds=3 * 3600,
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def evaluate_model_run(
    model_name: str, trained: dict, experiment: ExperimentConfig, parquet: str, tracking_uri: str
) -> dict:
    """Score the model on the test split; logs metrics, signatures and outputs to its run.

    Returns the metrics and the path of the outputs record a paired test needs later
    (hypotheses and references, or per-line log-likelihoods)."""
    client = mlflow_client(tracking_uri)
    run_id = trained["run_id"]
    started = time.perf_counter()
    result = evaluate_model(Path(trained["model_dir"]), Path(parquet), experiment)
    result.metrics["eval_time_s"] = time.perf_counter() - started
    outputs_path = Path(trained["model_dir"]) / "evaluation" / "outputs.json"
    atomic_write_text(outputs_path, json.dumps(outputs_record(result)))
    log_evaluation(client, run_id, model_name, result)
    client.log_artifact(run_id, str(outputs_path), "evaluation")
    return {"metrics": result.metrics, "outputs_path": str(outputs_path)}


def log_evaluation(client, run_id: str, model_name: str, result: EvaluationResult) -> None:
    """Test metrics, signatures, outputs and a Markdown artifact of one evaluation."""
    for key, value in result.metrics.items():
        client.log_metric(run_id, key, value)
    for key, signature in result.signature_tags().items():
        client.set_tag(run_id, key, signature)
    client.set_tag(run_id, "test_set_digest", result.test_digest)
    with tempfile.TemporaryDirectory() as tmp_dir:
        files = {
            "metrics.json": json.dumps(
                {"metrics": result.metrics, "signatures": result.signatures}, indent=2
            )
        }
        if result.references:  # translations or summaries, line by line
            files["hypotheses.txt"] = "\n".join(result.outputs) + "\n"
            files["references.txt"] = "\n".join(result.references) + "\n"
        else:
            files["samples.txt"] = "\n\n".join(result.outputs) + "\n"
        for name, text in files.items():
            (Path(tmp_dir) / name).write_text(text, encoding="utf-8")
            client.log_artifact(run_id, str(Path(tmp_dir) / name), "evaluation")
    create_markdown_artifact(
        markdown=metrics_markdown(model_name, result), description=f"{model_name} evaluation"
    )


@task(name="lead-baseline", timeout_seconds=3600)
def evaluate_lead_baseline(
    experiment: ExperimentConfig,
    parquet: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    *,
    corpus_version: str | None = None,
) -> dict:
    """Score the lead-N summariser (the first N words of each source) like a model, in a
    child run tagged stage=baseline (and with the digest of the corpus version it was scored
    on). It is never registered, so it can never be promoted; `seqmodels compare` lists it
    beside the versions."""
    n_words = experiment.evaluation.lead_words
    name = f"lead-{n_words}"
    client = mlflow_client(tracking_uri)
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, "stage": "baseline", "model_type": "lead"},
    )
    if corpus_version is not None:
        client.set_tag(run.info.run_id, "corpus_version", corpus_version)
    run_id = run.info.run_id
    client.log_param(run_id, "lead_words", n_words)
    started = time.perf_counter()
    result = evaluate_predictor(LeadBaseline(n_words), Path(parquet), experiment)
    result.metrics["eval_time_s"] = time.perf_counter() - started
    log_evaluation(client, run_id, name, result)
    client.set_terminated(run_id, status="FINISHED")
    return {"model": name, "run_id": run_id, "version": None, "metrics": result.metrics}
