"""The deployments of deployments/prefect.yaml on real servers, the way production runs them:
a `prefect server`, an `mlflow server` (SQLite + local artefact root), `prefect deploy` from
the repository root, a process work pool, and a `prefect worker` subprocess that picks up an
ad-hoc run triggered through the API. Everything listens on 127.0.0.1 on free ports. The
Kubernetes GPU pools (one node, two nodes) and deployments/prefect-gpu.yaml are registered
too, but not run."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import REPO
from tests.servers import BIN, background, checked_cli, free_port, tracking_servers

POOL = "seqmodels-local"
SCHEDULED = {
    "nightly-lm-shakespeare": "0 1 * * *",
    "nightly-mt-multi30k-de-en": "0 2 * * *",
    "weekly-retrain": "0 4 * * 0",
}
# Deployments of flows/watch.py (every 15 minutes; they emit seqmodels.corpus.changed).
WATCHES = {"watch-lm-shakespeare", "watch-mt-multi30k-de-en"}


def _flow_run_tree(client, root_id) -> list:
    """The flow run and all its subflow runs, at any depth."""
    runs = [client.read_flow_run(root_id)]
    parents = [root_id]
    while parents:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)
            )
        )
        runs += children
        parents = [c.id for c in children]
    return runs


def deploy_everything(client_env: dict) -> None:
    """What deployments/README.md tells an operator to run, from the repository root. The
    Kubernetes/GPU pools and their deployments are only registered, never run here: the
    server must accept the job templates and the deployments must refer to them."""
    prefect = str(BIN / "prefect")
    checked_cli([prefect, "work-pool", "create", POOL, "--type", "process"], client_env)
    deploy = [prefect, "--no-prompt", "deploy", "--all", "--prefect-file"]
    checked_cli([*deploy, "deployments/prefect.yaml"], client_env)
    checked_cli(
        [prefect, "work-pool", "create", "seqmodels-gpu", "--type", "kubernetes"]
        + ["--base-job-template", "deployments/k8s-gpu-job-template.json"],
        client_env,
    )
    checked_cli([*deploy, "deployments/prefect-gpu.yaml"], client_env)
    # The two-node pool (docs/scaling.md): one indexed Job, pod 0 runs the flow.
    checked_cli(
        [prefect, "work-pool", "create", "seqmodels-gpu-2node", "--type", "kubernetes"]
        + ["--base-job-template", "deployments/k8s-gpu-2node-job-template.json"],
        client_env,
    )


def check_and_pause_the_scheduled_deployments(client) -> dict:
    """The deployments of the process pool as prefect.yaml declares them; the scheduled and
    watch ones are paused (so that the worker picks up none of their runs). Returns the
    process pool's pipeline deployments by name."""
    all_deployments = client.read_deployments()
    deployments = {d.name: d for d in all_deployments if d.work_pool_name == POOL}
    gpu = {d.name: d for d in all_deployments if d.work_pool_name == "seqmodels-gpu"}
    assert set(deployments) == {*SCHEDULED, "adhoc", *WATCHES}
    for deployment in [deployments.pop(n) for n in WATCHES]:
        assert deployment.entrypoint == "flows/watch.py:watch_corpus_flow"
        assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
        # Not run here: they would list configs/default.yaml's sources.
        client.pause_deployment(deployment.id)
    assert set(gpu) == {"gpu-nightly", "gpu-adhoc"}
    gpu_pool = client.read_work_pool("seqmodels-gpu")
    assert "gpu_count" in gpu_pool.base_job_template["variables"]["properties"]
    for name, deployment in {**deployments, **gpu}.items():
        assert deployment.entrypoint == "flows/pipeline.py:pipeline_flow"
        # One run at a time; a run due while one is going waits its turn.
        assert deployment.global_concurrency_limit.limit == 1, name
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    for name, deployment in deployments.items():
        crons = [s.schedule.cron for s in deployment.schedules]
        assert crons == ([SCHEDULED[name]] if name in SCHEDULED else []), name
    assert deployments["weekly-retrain"].parameters["refresh_cache"] is True
    # The server already scheduled the coming nightly and weekly runs.
    upcoming = client.read_flow_runs(
        deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployments[n].id for n in SCHEDULED])
        ),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
    )
    assert {r.deployment_id for r in upcoming} == {deployments[n].id for n in SCHEDULED}
    # Keep them from firing should the test run just before 01:00, 02:00 or 04:00.
    for name in SCHEDULED:
        client.pause_deployment(deployments[name].id)
    return deployments


def check_every_stage_completed(client, flow_run) -> object:
    """The pipeline ran its experiment as a subflow, and every flow and task run of the tree
    completed (a cached task counts as completed). Returns the experiment's flow run."""
    runs = _flow_run_tree(client, flow_run.id)
    flow_names = [client.read_flow(r.flow_id).name for r in runs]
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
    )
    assert flow_names.count("seqmodels-experiment") == 1
    assert {r.state_type for r in runs} == {StateType.COMPLETED}
    assert {t.state_type for t in task_runs} == {StateType.COMPLETED}
    task_names = {t.name.rsplit("-", 1)[0] for t in task_runs}  # "train-468" -> "train"
    for stage in ("download", "clean", "vocab", "train", "evaluate", "register", "promote"):
        assert stage in task_names, task_names
    return runs[flow_names.index("seqmodels-experiment")]


def check_the_run_logged_to_mlflow(mlflow: MlflowClient, experiment_run) -> None:
    """A parent run linked to the experiment's Prefect flow run, the model's child run, a
    registered version and the champion alias."""
    experiment = mlflow.get_experiment_by_name("lm-shakespeare")
    mlflow_runs = mlflow.search_runs([experiment.experiment_id])
    parent = [r for r in mlflow_runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["prefect_flow_run_id"] == str(experiment_run.id)
    champion = mlflow.get_model_version_by_alias("lm-shakespeare", "champion")
    assert champion.version == "1"
    model_run = mlflow.get_run(champion.run_id)
    assert model_run.info.status == "FINISHED"
    assert model_run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert "test_bits_per_char" in model_run.data.metrics


@pytest.mark.e2e
def test_adhoc_deployment_runs_on_a_worker_against_prefect_and_mlflow_servers(tmp_path, mirror):
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    # conftest has already unset PREFECT_API_URL and MLFLOW_TRACKING_URI and muted telemetry.
    base_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    client_env = {**base_env, "PREFECT_API_URL": api}
    # What a production worker gets: where to log, where the corpora are, and short polling
    # so the test does not wait out the default 10-15 s intervals.
    worker_env = {
        **client_env,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "SEQMODELS_MIRROR": str(mirror),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    # The test's config: the small one from tests/configs with a work folder in tmp.
    config = tmp_path / "deploy-smoke.yaml"
    config.write_text(
        f"extends: {REPO / 'tests/configs/deploy-smoke.yaml'}\nwork_dir: {tmp_path / 'work'}\n"
    )
    worker_log = tmp_path / "worker.log"

    with contextlib.ExitStack() as stack:
        stack.enter_context(tracking_servers(tmp_path, base_env, prefect_port, mlflow_port))
        deploy_everything(client_env)
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))
        client = stack.enter_context(get_client(sync_client=True))
        deployments = check_and_pause_the_scheduled_deployments(client)
        # The worker starts once the scheduled and watch deployments are paused, so that it
        # picks up none of their runs (a watch run is due as soon as it is deployed).
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL]
        stack.enter_context(background(worker, worker_env, worker_log))
        started = time.monotonic()
        flow_run = run_deployment(
            "seqmodels-pipeline/adhoc",
            parameters={
                "config_path": str(config),
                "experiments": ["lm-shakespeare"],
                "refresh_cache": False,
            },
            timeout=300,
            poll_interval=2,
        )
        elapsed = time.monotonic() - started
        assert flow_run.state.is_completed(), (
            f"{flow_run.state!r} after {elapsed:.0f} s\n{worker_log.read_text()[-6000:]}"
        )

        assert flow_run.deployment_id == deployments["adhoc"].id
        experiment_run = check_every_stage_completed(client, flow_run)
        check_the_run_logged_to_mlflow(MlflowClient(mlflow_url), experiment_run)
    print(f"ad-hoc deployment run: {elapsed:.0f} s from trigger to completion")
