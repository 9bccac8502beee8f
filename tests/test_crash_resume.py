"""A flow run killed during training, with real processes: a `prefect server`, a process work
pool and a `prefect worker`. The process running the flow is SIGKILLed once the training has
written a checkpoint; Prefect must show that run as crashed, and the next run of the
deployment must resume the training from the checkpoint (same folder, same MLflow run)
instead of starting over."""

from __future__ import annotations

import contextlib
import os

import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import REPO, SHAKESPEARE_SHA256, SHAKESPEARE_URL
from tests.servers import (
    BIN,
    background,
    checked_cli,
    free_port,
    kill_flow_run_process,
    wait_for,
    wait_healthy,
)

POOL = "crash-test"

CONFIG = """
work_dir: {work}
mlflow_tracking_uri: sqlite:///{db}
experiments:
  lm-shakespeare:
    task: language_model
    corpus:
      kind: monolingual
      max_lines: 2000
      files: [{{url: {url}, sha256: {sha}}}]
    clean: {{deduplicate: false, remove_eval_overlap: false}}
    vocab: {{vocab_size: 300}}
    models:
      transformer:
        type: transformer_lm
        architecture: {{n_layer: 1, n_head: 2, d_model: 32, d_ff: 64, block_size: 32}}
        training: {{max_steps: 600, batch_tokens: 512, eval_every: 25, warmup_steps: 5,
                    checkpoint_every: 25}}
    evaluation: {{sample_tokens: 10}}
"""


def deploy_the_pipeline(client_env: dict) -> None:
    """The pipeline deployed from this repository (flow.from_source(...).deploy) to POOL."""
    checked_cli(
        [
            str(BIN / "python"),
            "-c",
            "from flows.pipeline import pipeline_flow;"
            f"pipeline_flow.from_source({str(REPO)!r}, 'flows/pipeline.py:pipeline_flow')"
            f".deploy('crash', work_pool_name={POOL!r}, print_next_steps=False)",
        ],
        client_env,
    )


@pytest.mark.e2e
def test_killed_flow_run_shows_crashed_and_the_next_run_resumes_training(tmp_path, mirror):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    work, db = tmp_path / "work", tmp_path / "mlflow.db"
    config = tmp_path / "crash.yaml"
    config.write_text(CONFIG.format(work=work, db=db, url=SHAKESPEARE_URL, sha=SHAKESPEARE_SHA256))
    base_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    client_env = {**base_env, "PREFECT_API_URL": api}
    worker_env = {
        **client_env,
        "SEQMODELS_MIRROR": str(mirror),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    params = {"config_path": str(config), "experiments": ["lm-shakespeare"]}
    with contextlib.ExitStack() as stack:
        log = tmp_path / "prefect-server.log"
        server = stack.enter_context(
            background(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
                + ["--port", str(port)],
                base_env,
                log,
            )
        )
        wait_healthy(f"{api}/health", server, log)
        prefect = str(BIN / "prefect")
        checked_cli([prefect, "work-pool", "create", POOL, "--type", "process"], client_env)
        deploy_the_pipeline(client_env)
        worker_log = tmp_path / "worker.log"
        worker = stack.enter_context(
            background([prefect, "worker", "start", "--pool", POOL], worker_env, worker_log)
        )

        with temporary_settings(updates={PREFECT_API_URL: api}):
            first = run_deployment("seqmodels-pipeline/crash", parameters=params, timeout=0)
            checkpoints = work / "lm-shakespeare" / "models"
            wait_for(
                lambda: list(checkpoints.glob("transformer-*/checkpoints/step-*.pt")),
                240,
                "the first checkpoint",
            )
            kill_flow_run_process(worker.pid, lambda: worker_log.read_text()[-3000:])
            with get_client(sync_client=True) as client:
                state = wait_for(
                    lambda: (s := client.read_flow_run(first.id).state).is_final() and s,
                    120,
                    "the killed run to be marked final",
                )
            assert state.type == StateType.CRASHED, state
            # Read once the process is dead: it trains on while the kill is on its way.
            killed_at = max(
                int(p.stem.split("-")[1])
                for p in checkpoints.glob("transformer-*/checkpoints/step-*.pt")
            )

            second = run_deployment(
                "seqmodels-pipeline/crash", parameters=params, timeout=600, poll_interval=2
            )
            assert second.state.is_completed(), worker_log.read_text()[-6000:]

    mlflow = MlflowClient(f"sqlite:///{db}")
    experiment = mlflow.get_experiment_by_name("lm-shakespeare")
    training_runs = mlflow.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    # One training run, resumed: the crashed attempt's run continued instead of a new one.
    assert len(training_runs) == 1
    run = training_runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["resumed_from_step"] >= 25
    assert run.data.metrics["resumed_from_step"] <= killed_at
    assert run.data.metrics["steps"] == 600
    assert mlflow.get_model_version_by_alias("lm-shakespeare", "champion").run_id == run.info.run_id
