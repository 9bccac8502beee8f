"""A corpus that grows between runs, end to end through the pipeline flow (in process, Prefect's
local API, MLflow on a temporary SQLite file): a run with nothing new trains nothing; a new
file trains and registers, from scratch or continuing the champion."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

WORDS = (
    "the a cat dog bird sat ran sang on in under mat park tree night day long dark cold young "
    "old king queen ship sea"
).split()


def sentences(seed: int, n: int) -> list[str]:
    """`n` distinct small sentences, deterministic in `seed`."""
    out = []
    for i in range(n):
        h = hashlib.sha256(f"{seed}-{i}".encode()).digest()
        out.append(" ".join(WORDS[b % len(WORDS)] for b in h[: 5 + h[31] % 4]))
    return out


def write_rows(folder: Path, name: str, texts: list[str], age: float = 3600.0) -> Path:
    """A jsonl file of {"text": ...} rows last changed `age` seconds ago (settled)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def pinned(path: Path, split: str, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{{url: {path.as_uri()!r}, sha256: {digest}, split: {split}}}"


def write_config(tmp_path: Path, models: str, name: str = "config.yaml") -> Path:
    """An LM experiment `grow` over tmp_path/incoming/*.jsonl, with pinned valid and test."""
    valid = pinned(tmp_path / "pinned" / "valid.txt", "valid", sentences(900, 20))
    test = pinned(tmp_path / "pinned" / "test.txt", "test", sentences(901, 20))
    glob = (tmp_path / "incoming").as_uri() + "/*.jsonl"
    path = tmp_path / name
    path.write_text(
        f"""
work_dir: {tmp_path / "runs"}
mlflow_tracking_uri: sqlite:///{tmp_path / "mlflow.db"}
experiments:
  grow:
    task: language_model
    corpus:
      kind: monolingual
      files:
        - {valid}
        - {test}
        - {{url: {glob!r}, split: train, format: jsonl, fields: {{text: text}},
            trust_listing: true}}
    clean: {{min_letter_fraction: null}}
    vocab: {{vocab_size: 40}}
    models:
{models}
    evaluation: {{sample_tokens: 4, num_samples: 1, bootstrap_samples: 100}}
"""
    )
    return path


NGRAM = "      kn: {type: ngram, architecture: {order: 2}}"


def run(config: Path, **kwargs) -> list[dict]:
    from flows.pipeline import pipeline_flow

    return pipeline_flow(str(config), **kwargs)


def _forget_mlflow_uris() -> None:
    """MLflow copies the URIs an in-process pipeline set into globals and the environment,
    where the next test's config would read them (MLFLOW_TRACKING_URI wins over the config)."""
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


@pytest.fixture()
def store(tmp_path, prefect_api):
    _forget_mlflow_uris()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.search_experiments()  # create the database once
    yield client
    _forget_mlflow_uris()


def run_logs(text: str) -> list[str]:
    """Messages containing `text` that Prefect's run loggers sent to the API (the console
    handler may hold a stream an earlier test's capture closed, so stderr is no witness)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(text=LogFilterTextSearch(query=text)))
    return [log.message for log in logs if text in log.message]


def pipeline_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("grow")
    return client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")


def test_no_new_data_trains_nothing_and_a_new_file_trains_and_registers(tmp_path, store):
    incoming = tmp_path / "incoming"
    write_rows(incoming, "part-1.jsonl", sentences(1, 60))
    config = write_config(tmp_path, NGRAM)

    first = run(config)
    assert [r["version"] for r in first] == ["1"]
    (parent,) = pipeline_runs(store)
    digest = parent.data.tags["corpus_version"]

    # Nothing landed: the run says so in one line, trains and registers nothing.
    started = time.perf_counter()
    assert run(config) == []
    assert time.perf_counter() - started < 60
    line = (
        f"grow: no new data since run {parent.info.run_id} (corpus version {digest}): "
        "nothing to train"
    )
    assert run_logs(f"no new data since run {parent.info.run_id}") == [line]
    assert len(run_logs("Beginning subflow run 'grow: clean'")) == 1  # the first run's
    assert len(store.search_model_versions("name = 'grow'")) == 1
    assert len(pipeline_runs(store)) == 1

    # --force trains anyway (the cached training registers no new version of the same run).
    forced = run(config, force=True)
    assert [r["version"] for r in forced] == ["1"]
    assert len(pipeline_runs(store)) == 2

    # A file lands: the next run trains and registers a new version on the new corpus version.
    write_rows(incoming, "part-2.jsonl", sentences(2, 40))
    third = run(config)
    assert [r["version"] for r in third] == ["2"]
    v2 = store.get_model_version("grow", "2")
    assert v2.tags["corpus_version"] != digest
    (dataset,) = store.get_run(v2.run_id).inputs.dataset_inputs  # MLflow's dataset input
    assert dataset.dataset.digest == v2.tags["corpus_version"]
    # The run reports what the new version brings against the last completed run's.
    newest = max(pipeline_runs(store), key=lambda r: r.info.start_time)
    update = store.download_artifacts(newest.info.run_id, "data/corpus_update.json", tmp_path)
    update = json.loads(Path(update).read_text())
    assert update["previous_corpus_version"] == digest
    assert [Path(url).name for url in update["files_added"]] == ["part-2.jsonl"]
    assert 0 < update["rows_added"] <= 40  # after de-duplication over the union
    text = update["columns"]["text"]
    assert text["new"]["rows"] == update["rows_added"] and text["older"]["rows"] >= 50
    assert text["new_unknown_piece_rate"] == 0.0  # the same words: the vocabulary covers them

    # A changed config on unchanged data still trains (another model, same corpus version).
    changed = write_config(
        tmp_path, NGRAM + "\n      kn3: {type: ngram, architecture: {order: 3}}", "changed.yaml"
    )
    assert sorted(r["model"] for r in run(changed)) == ["kn", "kn3"]


def test_the_no_new_data_artifact_is_a_prefect_markdown_artifact(tmp_path, store):
    from prefect import get_client

    write_rows(tmp_path / "incoming", "part-1.jsonl", sentences(1, 60))
    config = write_config(tmp_path, NGRAM)
    run(config)
    assert run(config) == []
    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts()
    texts = [a.data for a in artifacts if a.key == "grow-summary"]
    assert texts and "no new data since run" in texts[0]


LSTM = """      lstm:
        type: lstm_lm
        architecture: {emb_dim: 8, hidden_size: 8, n_layers: 1}
        training: {max_steps: 6, batch_tokens: 128, block_size: 16, eval_every: 3,
                   warmup_steps: 2, train_from: champion, continue_steps: 3,
                   replay_fraction: 0.5}"""


def test_a_new_file_continues_the_champion_with_its_vocabulary_and_both_corpus_versions(
    tmp_path, store, single_thread_torch
):
    incoming = tmp_path / "incoming"
    write_rows(incoming, "part-1.jsonl", sentences(1, 60))
    config = write_config(tmp_path, LSTM)

    # No champion yet: trained from scratch as configured.
    (first,) = run(config)
    v1 = store.get_model_version("grow", first["version"])
    assert "init_from" not in v1.tags and "train_from" not in v1.tags
    assert store.get_model_version_by_alias("grow", "champion").version == v1.version

    # A file lands: the champion is continued on the new corpus version.
    write_rows(incoming, "part-2.jsonl", sentences(2, 40))
    (second,) = run(config)
    v2 = store.get_model_version("grow", second["version"])
    assert str(v2.version) == "2"
    assert v2.tags["init_from"] == "models:/grow/1"
    assert v2.tags["parent_version"] == "1"
    assert v2.tags["train_from"] == "champion"
    # The champion's vocabulary, frozen (the vocab stage's new one is not used).
    assert v2.tags["vocab_sha256"] == v1.tags["vocab_sha256"]
    # continue_steps, not max_steps.
    child = store.get_run(v2.run_id)
    assert child.data.metrics["steps"] == 3
    # The decision names both corpus versions.
    assert v2.tags["promotion.challenger_corpus_version"] == v2.tags["corpus_version"]
    assert v2.tags["promotion.champion_corpus_version"] == v1.tags["corpus_version"]
    assert v1.tags["corpus_version"] != v2.tags["corpus_version"]
    assert v2.tags["champion_corpus_version"] == v1.tags["corpus_version"]


def test_replay_keeps_every_new_row_and_a_stable_fraction_of_the_older_ones(tmp_path):
    import polars as pl

    from seqmodels.data.replay import continuation_parquet, replayed

    rows = [("train", "file:///old.jsonl", i) for i in range(1, 1001)]
    rows += [("train", "file:///new.jsonl", i) for i in range(1, 51)]
    rows += [("test", "file:///test.txt", i) for i in range(1, 11)]
    frame = pl.DataFrame(
        {
            "id": list(range(len(rows))),
            "split": [r[0] for r in rows],
            "text": [f"{r[1]} {r[2]}" for r in rows],
            "source_file": [r[1] for r in rows],
            "line": [r[2] for r in rows],
        }
    )
    parquet = tmp_path / "corpus.parquet"
    frame.write_parquet(parquet)

    path, counts = continuation_parquet(parquet, ["file:///new.jsonl"], 0.3, tmp_path / "c")
    kept = pl.read_parquet(path)
    assert counts["continue_new_rows"] == 50
    assert 250 <= counts["continue_replayed_rows"] <= 350  # about 30% of 1000
    assert counts["continue_replayed_rows"] + counts["continue_dropped_rows"] == 1000
    assert kept.filter(pl.col("source_file") == "file:///new.jsonl").height == 50
    assert kept.filter(pl.col("split") == "test").height == 10
    # Deterministic, and a larger fraction replays a superset.
    old = kept.filter(pl.col("source_file") == "file:///old.jsonl")["line"].to_list()
    assert old == [i for i in range(1, 1001) if replayed("file:///old.jsonl", i, 0.3)]
    more = {i for i in range(1, 1001) if replayed("file:///old.jsonl", i, 0.6)}
    assert set(old) < more
    # Fraction 0: new files only; no new rows at all: every row is kept.
    path, counts = continuation_parquet(parquet, ["file:///new.jsonl"], 0.0, tmp_path / "c")
    assert pl.read_parquet(path).filter(pl.col("split") == "train").height == 50
    assert continuation_parquet(parquet, [], 0.0, tmp_path / "c")[0] == parquet


def test_train_from_settings_are_checked_per_family(tmp_path):
    from seqmodels.config import ConfigError, load_config

    write_rows(tmp_path / "incoming", "part-1.jsonl", sentences(1, 5))
    for models, expected in (
        (
            "      kn: {type: ngram, training: {train_from: champion}}",
            "train_from: Extra inputs are not permitted",
        ),
        (
            LSTM + "\n        init_from: models:/grow/1",
            "train_from: champion and init_from both",
        ),
        (LSTM.replace("0.5", "1.5"), "replay_fraction: Input should be less than or equal to 1"),
        (LSTM.replace("continue_steps: 3", "continue_steps: 0"), "continue_steps"),
    ):
        with pytest.raises(ConfigError, match=expected):
            load_config(write_config(tmp_path, models))
