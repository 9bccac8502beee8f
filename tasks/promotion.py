"""Champion/challenger promotion with a paired significance test, as a rollback-able task.

A new version first takes the `challenger` alias. It is compared with the `champion` on the
same test set (paired bootstrap: sacreBLEU's for BLEU, over lines for bits per character);
it takes `champion` only if it is better and p < alpha, or if there is no champion yet. The
decision, both scores, their intervals and the p-value go into the version's tags, a Markdown
report on its run, and a Prefect artifact.

Promotion runs inside a Prefect transaction (see flows/pipeline.py): when anything after the
alias moved fails, the rollback hook puts both aliases back. Promotions of one registered
model are serialised by a lock file (one machine) and, when a Prefect global concurrency
limit named `promote-<model>` exists, by that limit too (several machines, one registry).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.transactions import get_transaction

from seqmodels.config import ExperimentConfig
from seqmodels.evaluation.promotion import (
    CHALLENGER,
    CHAMPION,
    compare_with_champion,
    decide,
    decision_markdown,
    decision_summary,
    promotion_tags,
)
from seqmodels.evaluation.scoring import evaluate_predictor, outputs_record
from tasks.tracking import mlflow_client


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _corpus_version(client: MlflowClient, name: str, version: str) -> str | None:
    """The corpus version (lineage tag) a registered version was trained on, if recorded."""
    return client.get_model_version(name, version).tags.get("corpus_version")


def _restore_alias(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    if version is None:
        try:
            client.delete_registered_model_alias(name, alias)
        except MlflowException:
            pass
    else:
        client.set_registered_model_alias(name, alias, version)


def _lock_path(tracking_uri: str, name: str) -> Path:
    key = hashlib.sha256(f"{tracking_uri}|{name}".encode()).hexdigest()[:16]
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///") :]).parent
    else:
        folder = Path(tempfile.gettempdir()) / "seqmodels-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".promote-{key}.lock"


def _shared_limit(name: str) -> str | None:
    """The Prefect global concurrency limit guarding `name`, if a real server defines one
    (`prefect gcl create promote-NAME --limit 1`)."""
    if not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(f"promote-{name}")
        except ObjectNotFound:
            return None
    return f"promote-{name}"


@contextmanager
def promotion_lock(tracking_uri: str, name: str) -> Iterator[None]:
    """One promotion of `name` at a time (processes on this machine; Prefect limit beyond)."""
    with open(_lock_path(tracking_uri, name), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            limit = _shared_limit(name)
            if limit is None:
                yield
            else:
                with concurrency(limit, occupy=1, strict=True):
                    yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _champion_outputs(
    client: MlflowClient,
    name: str,
    *,
    version: str,
    test_digest: str,
    experiment: ExperimentConfig,
    parquet: str,
) -> dict:
    """The champion's test outputs: its logged ones when it saw the same test set, otherwise
    a fresh evaluation of the champion model on this test set."""
    run_id = client.get_model_version(name, version).run_id
    tags = client.get_run(run_id).data.tags
    if tags.get("test_set_digest") == test_digest:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(run_id, "evaluation", tmp))
            return json.loads((local / "outputs.json").read_text(encoding="utf-8"))
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    result = evaluate_predictor(model.unwrap_python_model().predictor, Path(parquet), experiment)
    return outputs_record(result)


@task(name="promote", timeout_seconds=3600)
def promote_if_better(
    registered_name: str,
    version: str,
    *,
    model_name: str,
    run_id: str,
    outputs_path: str,
    experiment: ExperimentConfig,
    parquet: str,
    tracking_uri: str,
) -> dict:
    """Give `version` the challenger alias, test it against the champion, promote if it wins."""
    client = mlflow_client(tracking_uri)
    alpha = experiment.evaluation.significance_level
    outputs = json.loads(Path(outputs_path).read_text(encoding="utf-8"))
    decided = client.get_model_version(registered_name, version).tags.get("promotion.decision")
    if decided:  # a re-run with a cached training: this version was judged already
        return {
            "promoted": decided == "promoted",
            "decision": f"version {version} ({model_name}): {decided} (decided earlier)",
            "p_value": None,
        }
    with promotion_lock(tracking_uri, registered_name):
        previous = {a: _alias(client, registered_name, a) for a in (CHAMPION, CHALLENGER)}
        # The rollback hook restores exactly these, whatever happens after this line.
        txn = get_transaction()
        txn.set("previous_aliases", previous)
        txn.set("registered_name", registered_name)
        txn.set("tracking_uri", tracking_uri)
        client.set_registered_model_alias(registered_name, CHALLENGER, version)
        champion = previous[CHAMPION]
        comparison = None
        if champion is not None:
            champion_outputs = _champion_outputs(
                client,
                registered_name,
                version=champion,
                test_digest=outputs["test_digest"],
                experiment=experiment,
                parquet=parquet,
            )
            comparison = compare_with_champion(outputs, champion_outputs, experiment)
        promoted, reason = decide(comparison, experiment.higher_is_better, alpha)
        tags = promotion_tags(comparison, promoted, reason, champion, alpha)
        # The data each side saw: a challenger trained on a newer corpus names both versions.
        sides = {"challenger": version} | ({"champion": champion} if champion is not None else {})
        corpus_versions = {s: _corpus_version(client, registered_name, v) for s, v in sides.items()}
        for side, digest in corpus_versions.items():
            if digest is not None:
                tags[f"promotion.{side}_corpus_version"] = digest
        if comparison is not None:
            client.log_metric(run_id, "promotion_p_value", comparison.p_value)
        for key, value in tags.items():
            client.set_model_version_tag(registered_name, version, key, value)
        report = decision_markdown(
            registered_name,
            version,
            model_name=model_name,
            champion=champion,
            c=comparison,
            promoted=promoted,
            reason=reason,
        )
        seen = ", ".join(f"{s} {digest or 'not recorded'}" for s, digest in corpus_versions.items())
        report += f"\nCorpus versions: {seen}.\n"
        client.log_text(run_id, report, "promotion/decision.md")
        if promoted:
            client.set_registered_model_alias(registered_name, CHAMPION, version)
            client.delete_registered_model_alias(registered_name, CHALLENGER)
    create_markdown_artifact(markdown=report, description=f"{model_name}: promotion decision")
    decision = decision_summary(version, model_name, promoted, reason)
    get_run_logger().info(decision)
    return {
        "promoted": promoted,
        "decision": decision,
        "p_value": None if comparison is None else comparison.p_value,
    }


@promote_if_better.on_rollback
def _restore_aliases(transaction) -> None:
    """Put `champion` and `challenger` back where they were before this promotion."""
    previous = transaction.get("previous_aliases", None)
    if previous is None:
        return
    name, uri = transaction.get("registered_name"), transaction.get("tracking_uri")
    client = mlflow_client(uri)
    for alias, version in previous.items():
        _restore_alias(client, name, alias, version)
