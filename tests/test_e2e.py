"""Both default experiments, end to end, on a slice of the mirror: real Prefect (local
temporary server), real MLflow (temp SQLite), the real CLI in a subprocess."""

from __future__ import annotations

import re
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.pipeline_cli import CLI, cli_env, run_checked


def _run(args, cwd, env, timeout=900):
    result = run_checked(args, cwd, env, timeout=timeout)
    return result.stdout + result.stderr


@pytest.mark.e2e
def test_pipeline_registers_serves_skips_unchanged_data_and_caches_stages(tmp_path, mirror):
    db = tmp_path / "mlflow.db"
    env = cli_env(tmp_path, mirror)
    cli = [*CLI, "run", "--config", str(REPO / "configs/smoke.yaml")]
    first = _run(cli, tmp_path, env)
    assert "seqmodels results" in first
    for model in ("kn5", "lstm", "transformer", "rnn", "lstm_attention"):
        assert model in first
    # Training reports its progress in the task log (and MLflow's noise is gone).
    assert re.search(r"rnn: step 30/30 \(100%\) loss \d+\.\d+ .* tokens/s", first)
    assert "interpreted in multiple ways" not in first
    assert "type hints to the `predict` method" not in first

    client = MlflowClient(f"sqlite:///{db}")
    for name, n_models in (("lm-shakespeare", 4), ("mt-multi30k-de-en", 2)):
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == n_models
        champion = client.get_model_version_by_alias(name, "champion")
        run = client.get_run(champion.run_id)
        assert run.data.tags["mlflow.parentRunId"]
        assert {"data_sha256", "vocab_sha256", "config_hash", "code_commit"} <= set(champion.tags)
    lm_runs = client.search_runs(
        [client.get_experiment_by_name("lm-shakespeare").experiment_id],
        "tags.stage = 'train'",
    )
    for run in lm_runs:
        assert {"test_bits_per_char", "test_ppl_per_word", "test_ppl_per_token"} <= set(
            run.data.metrics
        )
    mt_run = client.get_run(
        client.get_model_version_by_alias("mt-multi30k-de-en", "champion").run_id
    )
    assert "test_bleu" in mt_run.data.metrics
    assert mt_run.data.tags["sacrebleu.bleu.signature"].startswith("nrefs:1|case:mixed")

    # A fresh Python process loads the champion by alias and translates.
    uri = f"sqlite:///{db}"
    probe = (
        f"import mlflow; mlflow.set_tracking_uri({uri!r});"
        "m = mlflow.pyfunc.load_model('models:/mt-multi30k-de-en@champion');"
        "out = m.predict(['Ein Mann fährt Fahrrad.']);"
        "assert isinstance(out[0], str); print('OK', out)"
    )
    assert "OK" in _run([sys.executable, "-c", probe], tmp_path, env, timeout=300)

    # Unchanged inputs (same corpus version, same config): the run says there is nothing new
    # and stops after the download stage (cached), training and registering nothing.
    second = _run([*cli, "--experiment", "lm-shakespeare"], tmp_path, env)
    assert "lm-shakespeare: no new data since run" in second
    assert _cached(second, "download")
    for stage in ("clean", "vocab", "train"):
        assert f"Task run '{stage}-" not in second, stage
    assert len(client.search_model_versions("name = 'lm-shakespeare'")) == 4

    # A changed config on the same data trains (a changed config is never "nothing new"), and
    # every stage whose inputs did not change comes from Prefect's cache: download, clean,
    # vocab, and the three models whose settings are unchanged (no new version for them).
    one_model = tmp_path / "one-model.yaml"
    one_model.write_text(
        f"extends: {REPO / 'configs/smoke.yaml'}\n"
        "experiments: {lm-shakespeare: {models: {rnn: {training: {max_steps: 31}}}}}\n"
    )
    cached = _run([*cli[:-1], str(one_model), "--experiment", "lm-shakespeare"], tmp_path, env)
    for stage in ("download", "clean", "vocab"):
        assert _cached(cached, stage), stage
    trainings = [line for line in cached.splitlines() if "Task run 'train-" in line]
    assert sum("Cached" in line for line in trainings) == 3, trainings
    assert len(client.search_model_versions("name = 'lm-shakespeare'")) == 5

    # A changed cleaning rule re-runs clean, vocab and everything after, and nothing before.
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        f"extends: {REPO / 'configs/smoke.yaml'}\n"
        "experiments: {lm-shakespeare: {clean: {min_chars: 3}}}\n"
    )
    third = _run([*cli[:-1], str(changed), "--experiment", "lm-shakespeare"], tmp_path, env)
    assert _cached(third, "download")
    for stage in ("clean", "vocab", "train"):
        assert not _cached(third, stage), stage
    assert len(client.search_model_versions("name = 'lm-shakespeare'")) == 9


def _cached(log: str, stage: str) -> bool:
    return any(f"Task run '{stage}-" in line and "Cached" in line for line in log.splitlines())
