"""Significance tests, champion/challenger promotion, rollback and concurrent registrations,
against a real MLflow store (SQLite, and an `mlflow server` on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from prefect import flow, task
from prefect.transactions import transaction

from seqmodels.config import ExperimentConfig
from seqmodels.evaluation.promotion import CHALLENGER, CHAMPION, decide
from seqmodels.evaluation.significance import compare_language_models, compare_translations
from tasks.promotion import promote_if_better
from tasks.registry import register_model_version
from tasks.tracking import experiment_id, mlflow_client
from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent
LM_EXPERIMENT = ExperimentConfig.model_validate(
    {
        "task": "language_model",
        "corpus": {"kind": "monolingual", "files": [{"url": "https://h/t.txt"}]},
        "models": {"kn": {"type": "ngram", "architecture": {"order": 3}}},
    }
)


def _line_nll(quality: float, n: int = 400, seed: int = 0) -> list[float]:
    """Per-line NLL of a model `quality` times as good as a reference one."""
    base = np.random.default_rng(seed).gamma(4.0, 5.0, size=n)
    return (base * quality).tolist()


def test_identical_language_models_are_not_significantly_different():
    nll = np.array(_line_nll(1.0))
    c = compare_language_models(nll, nll.copy(), np.full(len(nll), 40))
    assert c.challenger == c.champion and c.p_value > 0.5
    assert decide(c, higher_is_better=False, alpha=0.05)[0] is False


def test_a_clearly_better_language_model_wins_with_a_small_p_value():
    chars = np.full(400, 40)
    c = compare_language_models(np.array(_line_nll(0.9)), np.array(_line_nll(1.0)), chars)
    assert c.challenger < c.champion and c.p_value < 0.01
    assert c.challenger_ci[0] < c.challenger < c.challenger_ci[1]
    assert decide(c, higher_is_better=False, alpha=0.05) == (
        True,
        f"better and significant (p={c.p_value:.4f} < 0.05)",
    )
    # A tiny, noisy improvement is "better but not significant".
    noisy = np.array(_line_nll(1.0)) * np.random.default_rng(1).normal(1.0, 0.2, 400)
    noisy *= np.array(_line_nll(1.0)).sum() * 0.999 / noisy.sum()
    c = compare_language_models(noisy, np.array(_line_nll(1.0)), chars)
    promoted, reason = decide(c, higher_is_better=False, alpha=0.05)
    assert not promoted and reason.startswith("better but not significant")


def test_sacrebleu_paired_bootstrap_separates_good_from_bad_translations():
    refs = [f"a man number {i} rides a red bike down the street" for i in range(200)]
    good = [r.replace("red", "blue") if i % 5 == 0 else r for i, r in enumerate(refs)]
    bad = [r.replace("rides", "eats").replace("street", "cake") for r in refs]
    c = compare_translations(good, bad, refs, n_samples=200)
    assert c.challenger > c.champion and c.p_value < 0.05
    assert c.metric == "test_bleu"


# --- registry: real MLflow ------------------------------------------------------------------


def _register_and_promote(uri: str, model_dir: str, nll: list[float], fail_after=False) -> dict:
    """What the pipeline does per model: a child run with evaluation outputs, then register and
    promote inside one transaction; `fail_after` raises after promotion (rollback test)."""
    client = mlflow_client(uri)
    exp_id = experiment_id(client, "lm-promo", uri)
    run_id = client.create_run(exp_id).info.run_id
    outputs = Path(model_dir).parent / f"outputs-{run_id}.json"
    record = {"test_digest": "d1", "line_nll": nll, "line_chars": [40] * len(nll)}
    outputs.write_text(json.dumps(record))
    client.log_artifact(run_id, str(outputs), "evaluation")
    # The champion's outputs are read from evaluation/outputs.json of its run.
    client.log_text(run_id, json.dumps(record), "evaluation/outputs.json")
    client.set_tag(run_id, "test_set_digest", "d1")
    parquet = str(Path(model_dir).parent / "clean" / "corpus.parquet")

    @task
    def quality_gate():
        raise RuntimeError("a later step failed")

    @flow
    def register_flow():
        with transaction():
            reg = register_model_version(
                "lm-promo",
                "kn",
                trained={"run_id": run_id, "model_dir": model_dir},
                task_kind="language_model",
                tracking_uri=uri,
                lineage={"config_hash": "abc", "data_sha256": "0" * 64},
                parquet=parquet,
            )
            decision = promote_if_better(
                "lm-promo",
                reg["version"],
                model_name="kn",
                run_id=run_id,
                outputs_path=str(outputs),
                experiment=LM_EXPERIMENT,
                parquet=parquet,
                tracking_uri=uri,
            )
            if fail_after:
                quality_gate()
        return {**reg, **decision}

    return register_flow()


def _aliases(uri: str) -> dict:
    model = mlflow_client(uri).get_registered_model("lm-promo")
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_challenger_takes_champion_only_when_significantly_better(
    tmp_path, tiny_ngram_dir, prefect_api
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _register_and_promote(uri, str(tiny_ngram_dir), _line_nll(1.0))
    assert first["promoted"] and _aliases(uri) == {CHAMPION: "1"}

    worse = _register_and_promote(uri, str(tiny_ngram_dir), _line_nll(1.05))
    assert not worse["promoted"]
    assert _aliases(uri) == {CHAMPION: "1", CHALLENGER: "2"}

    better = _register_and_promote(uri, str(tiny_ngram_dir), _line_nll(0.9))
    assert better["promoted"] and better["p_value"] < 0.05
    assert _aliases(uri) == {CHAMPION: "3"}

    client = mlflow_client(uri)
    tags = client.get_model_version("lm-promo", "3").tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.champion_version"] == "1"
    assert float(tags["promotion.p_value"]) < 0.05
    assert tags["config_hash"] == "abc" and tags["mlflow_run_id"]
    run = client.get_run(tags["mlflow_run_id"])
    assert run.inputs.dataset_inputs[0].dataset.name == "clean"  # the Parquet, via mlflow.data
    report = client.download_artifacts(tags["mlflow_run_id"], "promotion/decision.md", tmp_path)
    assert "promoted to champion" in Path(report).read_text()
    # The champion loads and works from a fresh URI.
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/lm-promo@champion")
    assert float(model.predict(["ROMEO: the night"], params={"task": "score"})[0]) > 1.0
    seeded = [model.predict(["ROMEO: the night"], params={"seed": 1})[0] for _ in range(2)]
    assert seeded[0] == seeded[1]  # the seed param reaches the sampler


def test_failure_after_promotion_rolls_back_alias_and_version(
    tmp_path, tiny_ngram_dir, prefect_api
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register_and_promote(uri, str(tiny_ngram_dir), _line_nll(1.0))
    with pytest.raises(RuntimeError, match="a later step failed"):
        _register_and_promote(uri, str(tiny_ngram_dir), _line_nll(0.5), fail_after=True)
    assert _aliases(uri) == {CHAMPION: "1"}
    versions = mlflow_client(uri).search_model_versions("name='lm-promo'")
    assert [str(v.version) for v in versions] == ["1"]  # the half-registered version is gone


# --- two pipelines finishing together --------------------------------------------------------

WORKER = """
import json, sys
from tests.test_promotion import _register_and_promote, _line_nll
uri, model_dir, quality = sys.argv[1], sys.argv[2], float(sys.argv[3])
print(json.dumps(_register_and_promote(uri, model_dir, _line_nll(quality))))
"""


def _run_two_workers(uri: str, model_dir: str, tmp_path: Path) -> list[dict]:
    procs = []
    for i, quality in enumerate((0.8, 0.9)):
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp_path / f"prefect-{i}"),
            "PYTHONPATH": str(REPO),
        }
        env.pop("PREFECT_API_URL", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, uri, model_dir, str(quality)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _check_after_race(uri: str, results: list[dict]) -> None:
    client = mlflow_client(uri)
    versions = sorted(str(v.version) for v in client.search_model_versions("name='lm-promo'"))
    assert versions == ["1", "2", "3"]  # nothing lost
    # Whatever the order, the best model (quality 0.8, the first worker) ends as champion.
    best = results[0]["version"]
    assert _aliases(uri)[CHAMPION] == best
    for v in versions:
        assert client.get_model_version("lm-promo", v).tags["promotion.decision"]


def test_two_processes_registering_at_once_on_sqlite(tmp_path, tiny_ngram_dir, prefect_api):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register_and_promote(uri, str(tiny_ngram_dir), _line_nll(1.0))  # creates the store
    _check_after_race(uri, _run_two_workers(uri, str(tiny_ngram_dir), tmp_path))


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            (tmp_path / "server-artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_two_processes_registering_at_once_on_an_mlflow_server(
    tmp_path, tiny_ngram_dir, prefect_api, mlflow_server
):
    _register_and_promote(mlflow_server, str(tiny_ngram_dir), _line_nll(1.0))
    _check_after_race(mlflow_server, _run_two_workers(mlflow_server, str(tiny_ngram_dir), tmp_path))
