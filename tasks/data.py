"""Prefect tasks for the data stages: download, clean, vocabulary.

These are cached across runs (inputs + task source, results persisted). Their outputs live
in content-keyed folders under the work dir, and the cache key includes the work dir's
workspace id, so deleting the work dir also invalidates the cache instead of leaving Prefect
pointing at files that are gone.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from seqmodels.data.clean import clean_corpus
from seqmodels.data.clean_report import write_report
from seqmodels.data.corpus_changes import corpus_update_markdown, describe_corpus_update
from seqmodels.data.corpus_reader import prepare_inputs
from seqmodels.data.download import TransientDownloadError, download_file
from seqmodels.data.settings import CleanConfig, CorpusConfig, SourceFile, VocabConfig
from seqmodels.data.sources import (
    CorpusVersion,
    FetchedFile,
    ListedFile,
    Listing,
    fetch_listed,
    list_source,
    read_corpus_version,
    version_report,
)
from seqmodels.data.vocab import train_sentencepiece
from seqmodels.files import atomic_write_text, json_digest
from tasks.tracking import mlflow_client

CACHED = INPUTS + TASK_SOURCE


def workspace_id(work_dir: Path) -> str:
    """A random id stored in the work dir; part of every cache key (see module docstring)."""
    marker = Path(work_dir) / ".workspace-id"
    if not marker.exists():
        atomic_write_text(marker, uuid.uuid4().hex)
    return marker.read_text().strip()


def _is_transient(task, task_run, state) -> bool:
    """Retry only failures that can go away: never a 404 or a checksum mismatch."""
    try:
        state.result()
    except TransientDownloadError:
        return True
    except Exception:
        return False
    return False


# Every task that reaches the network: three tries, backing off, for transient failures only.
NETWORK_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": _is_transient,
}


@task(
    name="download",
    cache_policy=CACHED,
    persist_result=True,
    **NETWORK_RETRIES,
    timeout_seconds=3600,
)
def download_corpus_file(
    source: SourceFile, mirrors: list[str], cache_dir: str, workspace: str
) -> str:
    """Fetch one corpus file (mirrors first), checked against its sha256; returns its path."""
    path = download_file(
        source.url,
        source.sha256,
        Path(cache_dir),
        mirrors,
        storage_options=source.storage_options,
    )
    return str(path)


# Listing is never cached: each run lists its growing entries afresh, once, at its start.
@task(
    name="list-source",
    cache_policy=NO_CACHE,
    **NETWORK_RETRIES,
    timeout_seconds=600,
)
def list_growing_source(source: SourceFile, mirrors: list[str], cache_dir: str) -> Listing:
    """The files a growing corpus entry names now (its manifest, glob or prefix)."""
    return list_source(source, Path(cache_dir), mirrors)


# No Prefect cache: seqmodels.data.sources finds a listed file in the download cache by its
# digest (or, for a trusted listing, by url, size and mtime) and fetches only new files.
@task(
    name="download-listed",
    cache_policy=NO_CACHE,
    **NETWORK_RETRIES,
    timeout_seconds=3600,
)
def download_listed_file(
    listed: ListedFile, source: SourceFile, mirrors: list[str], cache_dir: str
) -> FetchedFile:
    """One file of a growing entry in the download cache, checked against its manifest."""
    return fetch_listed(listed, source, Path(cache_dir), mirrors)


@task(name="clean", cache_policy=CACHED, persist_result=True, timeout_seconds=3600)
def clean_corpus_files(
    raw_paths: list[str],
    corpus: CorpusConfig,
    clean: CleanConfig,
    work_dir: str,
    workspace: str,
    *,
    corpus_version: dict | None = None,
) -> dict[str, str]:
    """Decompress and normalise each file, then clean them into Parquet + a quality report.
    `corpus_version` (ResolvedCorpus.record()) goes beside the report as corpus_version.json,
    its digest and file count into the report."""
    out_dir = (
        Path(work_dir) / "clean" / json_digest(raw_paths, corpus.model_dump(), clean.model_dump())
    )
    inputs = prepare_inputs([Path(p) for p in raw_paths], corpus, Path(work_dir))
    parquet, report = clean_corpus(
        inputs, out_dir, clean, corpus.kind, src_lang=corpus.src_lang, tgt_lang=corpus.tgt_lang
    )
    outputs = {"parquet": str(parquet)}
    if corpus_version is not None:
        report["corpus_version"] = version_report(corpus_version)
        version_path = out_dir / "corpus_version.json"
        atomic_write_text(version_path, json.dumps(corpus_version, indent=2))
        outputs["corpus_version"] = str(version_path)
    report_json, report_md = write_report(report, out_dir)
    create_markdown_artifact(
        key="cleaning-report", markdown=report_md.read_text(), description="Cleaning report"
    )
    return {**outputs, "report_json": str(report_json), "report_md": str(report_md)}


@task(name="vocab", cache_policy=CACHED, persist_result=True, timeout_seconds=3600)
def train_vocabulary(
    parquet: str, columns: list[str], vocab: VocabConfig, work_dir: str, workspace: str
) -> str:
    """Train SentencePiece on the train split; returns the .model path."""
    out_dir = Path(work_dir) / "vocab" / json_digest(parquet, columns, vocab.model_dump())
    return str(train_sentencepiece(Path(parquet), columns, out_dir, vocab))


@task(name="corpus-update", timeout_seconds=1800)
def report_corpus_update(
    tracking_uri: str,
    previous_run_id: str | None,
    parent_run_id: str,
    data: dict[str, str],
    columns: list[str],
) -> dict:
    """Compare this run's corpus version with the one the last completed run saw (its
    data/corpus_version.json, and its SentencePiece model as the vocabulary in use), log the
    comparison to this run's MLflow parent run and show it as a Prefect artifact."""
    client = mlflow_client(tracking_uri)
    current = read_corpus_version(data["corpus_version"])
    with tempfile.TemporaryDirectory() as tmp:
        previous, vocab = None, None
        if previous_run_id is not None:
            previous = logged_corpus_version(client, previous_run_id)
            vocab = _logged_vocabulary(client, previous_run_id, tmp)
        update = describe_corpus_update(data["parquet"], current, previous, columns, vocab)
    markdown = corpus_update_markdown(update)
    client.log_dict(parent_run_id, update, "data/corpus_update.json")
    client.log_text(parent_run_id, markdown, "data/corpus_update.md")
    client.log_metric(parent_run_id, "corpus_rows_added", update["rows_added"])
    client.log_metric(parent_run_id, "corpus_files_added", len(update["files_added"]))
    create_markdown_artifact(markdown, key="corpus-update", description="Corpus update")
    return update


def logged_corpus_version(client, run_id: str) -> CorpusVersion | None:
    """The corpus version pipeline run `run_id` recorded (data/corpus_version.json); None
    for runs from before corpus versions."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "data/corpus_version.json", tmp)
            return read_corpus_version(path)
    except (MlflowException, OSError, ValueError):
        return None


def _logged_vocabulary(client, run_id: str, tmp: str) -> str | None:
    """The SentencePiece model a pipeline run logged (vocab/*.model), or None."""
    try:
        models = [
            a.path for a in client.list_artifacts(run_id, "vocab") if a.path.endswith(".model")
        ]
        return client.download_artifacts(run_id, models[0], tmp) if models else None
    except (MlflowException, OSError):
        return None
