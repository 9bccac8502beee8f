"""One Prefect subflow per pipeline stage, so the Prefect UI shows each stage as its own run
with its task runs, logs and artifacts. No ML logic here: the tasks call seqmodels."""

from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.transactions import transaction

from seqmodels.config import (
    CleanConfig,
    CorpusConfig,
    ExperimentConfig,
    VocabConfig,
    without_distributed,
)
from seqmodels.data.sources import EntryFiles, FetchedFile, ResolvedCorpus, resolve_corpus
from tasks.data import (
    clean_corpus_files,
    download_corpus_file,
    download_listed_file,
    list_growing_source,
    train_vocabulary,
)
from tasks.modeling import (
    champion_start,
    continued_spec,
    evaluate_model_run,
    pin_init_from,
    train_model_run,
)
from tasks.promotion import promote_if_better
from tasks.registry import register_model_version
from tasks.tracking import mlflow_client


def parallel_trainings() -> int:
    """How many models train at once: one per GPU would fight for it, so GPU trainings run one
    at a time; on CPU, one per 8 cores (each training uses several threads)."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, (os.cpu_count() or 1) // 8)


@flow(name="download", flow_run_name="{experiment}: download")
def download_stage(
    experiment: str,
    corpus: CorpusConfig,
    *,
    mirrors: list[str],
    cache_dir: str,
    workspace: str,
    refresh_cache: bool = False,
) -> ResolvedCorpus:
    """Every corpus file, checked against its sha256 (cached, retried on transient errors);
    growing entries are listed once, here, and only their new files fetched. Returns the
    corpus as the union of those files with its frozen version."""
    # One after the other in this thread: Prefect enforces task timeouts only outside worker
    # threads.
    download = download_corpus_file.with_options(refresh_cache=refresh_cache)
    entries = []
    for f in corpus.files:
        if not f.is_growing:
            path = download(f, mirrors, cache_dir, workspace)
            entries.append(EntryFiles(f, (FetchedFile(f.url, path),)))
            continue
        listing = list_growing_source(f, mirrors, cache_dir)
        fetched = tuple(download_listed_file(item, f, mirrors, cache_dir) for item in listing.files)
        entries.append(EntryFiles(f, fetched, listing))
    resolved = resolve_corpus(corpus, entries)
    logger = get_run_logger()
    logger.info(
        "%s: corpus version %s, %d files",
        experiment,
        resolved.version.digest,
        len(resolved.version.files),
    )
    for s in resolved.sources:
        logger.info(
            "%s: %d files (%d new), %d left for the next run (%s)",
            s.url,
            s.files,
            s.downloaded,
            len(s.left_for_next_run),
            s.checksums,
        )
    return resolved


@flow(name="clean", flow_run_name="{experiment}: clean")
def clean_stage(
    experiment: str,
    corpus: ResolvedCorpus,
    *,
    clean: CleanConfig,
    work_dir: str,
    workspace: str,
    refresh_cache: bool = False,
) -> dict[str, str]:
    """Polars cleaning of the files the download stage resolved into Parquet plus the quality
    report, with the corpus version beside it (cached on its inputs)."""
    task = clean_corpus_files.with_options(refresh_cache=refresh_cache)
    return task(
        list(corpus.raw_paths),
        corpus.corpus,
        clean,
        work_dir,
        workspace,
        corpus_version=corpus.record(),
    )


@flow(name="vocab", flow_run_name="{experiment}: vocab")
def vocab_stage(
    experiment: str,
    parquet: str,
    *,
    columns: list[str],
    vocab: VocabConfig,
    work_dir: str,
    workspace: str,
    refresh_cache: bool = False,
) -> str:
    """SentencePiece trained on the train split (cached on its inputs)."""
    task = train_vocabulary.with_options(refresh_cache=refresh_cache)
    return task(parquet, columns, vocab, work_dir, workspace)


@flow(name="train", flow_run_name="{experiment}: train")
def train_stage(
    experiment: str,
    config: ExperimentConfig,
    *,
    parquet: str,
    spm_model: str | None,
    work_dir: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    workspace: str,
    refresh_cache: bool = False,
    corpus_version: str | None = None,
) -> dict[str, dict]:
    """Every model of the experiment; independent trainings run concurrently up to
    `parallel_trainings()` (see the task runner set by the caller). `corpus_version`: this
    run's corpus_version.json (what `train_from: champion` models compare with the
    champion's to find the new files)."""
    train = train_model_run.with_options(refresh_cache=refresh_cache)
    init_from, continued = starting_points(
        experiment,
        config,
        parquet=parquet,
        corpus_version=corpus_version,
        work_dir=work_dir,
        tracking_uri=tracking_uri,
    )
    shared = {
        "task_kind": config.task,
        "decoding": config.evaluation.model_dump(),
        "work_dir": work_dir,
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "workspace": workspace,
        "from_scratch": refresh_cache,
    }

    def arguments(name: str) -> dict:
        """train_model_run's arguments for model `name`."""
        spec, data, spm, start = config.models[name], parquet, spm_model, init_from.get(name)
        lineage = None
        if continued.get(name) is not None:
            begin = continued[name]
            spec, data, start = continued_spec(spec), begin["parquet"], begin["init_from"]
            spm, lineage = begin["spm_model"] or spm_model, begin["lineage"]
        return shared | {
            "model_name": name,
            "spec": without_distributed(spec),
            "parquet": data,
            "spm_model": spm,
            "init_from": start,
            "extra_lineage": lineage,
            "distributed": getattr(spec.training, "distributed", None),  # out of the cache key
        }

    if parallel_trainings() == 1:
        # In this thread, so the task timeout is enforced (Prefect cannot stop worker threads).
        return {name: train(**arguments(name)) for name in config.models}
    futures = {name: train.submit(**arguments(name)) for name in config.models}
    wait(list(futures.values()))
    return {name: future.result() for name, future in futures.items()}


def starting_points(
    experiment: str,
    config: ExperimentConfig,
    *,
    parquet: str,
    corpus_version: str | None,
    work_dir: str,
    tracking_uri: str,
) -> tuple[dict[str, str], dict[str, dict | None]]:
    """Where each model that does not start from scratch starts: `init_from` warm starts
    pinned to one registered version (before anything is keyed or cached), and for
    `train_from: champion` models the champion's weights, vocabulary and the rows new since
    it (None: no champion of this model yet, so from scratch as configured)."""
    init_from = {
        name: pin_init_from(spec.init_from, experiment, tracking_uri)
        for name, spec in config.models.items()
        if spec.init_from is not None
    }
    continued = {
        name: champion_start(
            experiment,
            name,
            spec=spec,
            parquet=parquet,
            corpus_version=corpus_version,
            work_dir=work_dir,
            tracking_uri=tracking_uri,
        )
        for name, spec in config.models.items()
        if getattr(spec.training, "train_from", "scratch") == "champion"
    }
    return init_from, continued


def train_stage_runner(experiment: str):
    """train_stage with a task runner sized for this machine."""
    workers = parallel_trainings()
    get_run_logger().info("%s: training up to %d model(s) at once", experiment, workers)
    return train_stage.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))


@flow(name="evaluate-register", flow_run_name="{experiment}: evaluate and register")
def evaluate_register_stage(
    experiment: str,
    config: ExperimentConfig,
    *,
    trained: dict[str, dict],
    parquet: str,
    tracking_uri: str,
    lineage: dict[str, str],
) -> list[dict]:
    """Per model: evaluate, register and promote, as one Prefect transaction.

    A failure anywhere in the three rolls back the aliases and deletes the half-registered
    version, so the champion is never a model whose evaluation or promotion did not finish.
    """
    logger = get_run_logger()
    client = mlflow_client(tracking_uri)
    rows = []
    for model_name, result in trained.items():
        spec = config.models[model_name]
        with transaction():
            evaluated = evaluate_model_run(model_name, result, config, parquet, tracking_uri)
            registered = register_model_version(
                experiment,
                model_name,
                trained=result,
                task_kind=config.task,
                tracking_uri=tracking_uri,
                lineage={**lineage, **result.get("lineage", {}), "model_type": spec.type},
                parquet=parquet,
            )
            promotion = promote_if_better(
                experiment,
                registered["version"],
                model_name=model_name,
                run_id=result["run_id"],
                outputs_path=evaluated["outputs_path"],
                experiment=config,
                parquet=parquet,
                tracking_uri=tracking_uri,
            )
        client.set_terminated(result["run_id"], status="FINISHED")
        logger.info(promotion["decision"])
        rows.append(
            {
                "experiment": experiment,
                "model": model_name,
                "run_id": result["run_id"],
                "version": registered["version"],
                "metrics": evaluated["metrics"],
            }
        )
    return rows
