"""Continuous training, the way production runs it (issue 13): a `prefect server` (with its
trigger service), an `mlflow server`, `prefect deploy` of a prefect.yaml modelled on
deployments/prefect.yaml, a process work pool and a `prefect worker`, all on 127.0.0.1.

The story, in order:

1. A growing folder holds 2 train files: the nightly deployment's run freezes corpus
   version A and registers version 1, the champion.
2. A third file lands, and a fourth is being written slowly. The watch deployment (run
   through the API rather than on its interval) emits `seqmodels.corpus.changed`; the
   nightly deployment's event trigger starts a run that continues the champion on version
   B (files 1-3: the fourth, still being written, is left for later), registers version 2
   and records the decision naming A and B.
3. Nothing lands: the next watch emits nothing and a run of the nightly deployment ends as
   "no new data" without a new version.
4. The fourth file is complete: the watch emits again and the trigger starts a run. While it
   runs, a second `seqmodels.corpus.changed` arrives: the trigger's run of it waits for the
   deployment's slot (ENQUEUE) instead of being dropped or running beside the first. The
   first run is SIGKILLed mid-training; the queued run then starts and resumes that
   training: exactly one new version.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import REPO
from tests.servers import (
    BIN,
    background,
    checked_cli,
    free_port,
    kill_flow_run_process,
    tracking_servers,
    wait_for,
)
from tests.test_corpus_updates import pinned, sentences, write_rows

POOL = "continuous-test"
EXPERIMENT = "grow"
EVENT = "seqmodels.corpus.changed"
NIGHTLY = "seqmodels-pipeline/nightly-grow"
WATCH = "seqmodels-watch-corpus/watch-grow"
SETTLE_SECONDS = 3
# Prefect's server on SQLite waits up to 60 s (its busy_timeout) for the write lock, and on
# two busy cores its trigger service and API can hold each other up that long. In one CI
# run the watch's event reached the server at once and the automation fired 2.5 s later,
# but both were written to the database 60-67 s after. So a wait for something the server
# writes allows for one such stall on top of the time the thing itself takes.
SQLITE_LOCK_WAIT_S = 60


def write_config(tmp_path: Path, mlflow_url: str) -> Path:
    """tests/configs/continuous.yaml with this test's folders: the growing folder of jsonl
    train files, pinned valid and test files, the work folder and the MLflow server."""
    valid = pinned(tmp_path / "pinned" / "valid.txt", "valid", sentences(900, 20))
    test = pinned(tmp_path / "pinned" / "test.txt", "test", sentences(901, 20))
    glob = (tmp_path / "incoming").as_uri() + "/*.jsonl"
    path = tmp_path / "continuous.yaml"
    path.write_text(
        f"""extends: {REPO / "tests/configs/continuous.yaml"}
work_dir: {tmp_path / "work"}
mlflow_tracking_uri: {mlflow_url}
experiments:
  {EXPERIMENT}:
    corpus:
      files:
        - {valid}
        - {test}
        - {{url: {glob!r}, split: train, format: jsonl, fields: {{text: text}},
            trust_listing: true, settle_seconds: {SETTLE_SECONDS}}}
"""
    )
    return path


def write_prefect_yaml(tmp_path: Path, config: Path) -> Path:
    """deployments/prefect.yaml's lm-shakespeare nightly deployment (its event trigger,
    concurrency limit and parameters) and its watch deployment, for this test's experiment
    and config. No schedules: the test starts every run through the API."""
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    deployments = []
    for name in ("nightly-lm-shakespeare", "watch-lm-shakespeare"):
        text = json.dumps(by_name[name])
        text = text.replace("lm-shakespeare", EXPERIMENT).replace(
            "configs/default.yaml", str(config)
        )
        deployment = json.loads(text)
        deployment.pop("schedules", None)
        deployment["work_pool"] = {"name": POOL, "work_queue_name": "default"}
        deployments.append(deployment)
    path = tmp_path / "prefect.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "seqmodels-continuous-test", "prefect-version": spec["prefect-version"]}
            | {"deployments": copy.deepcopy(deployments)},
            sort_keys=False,
        )
    )
    return path


@contextlib.contextmanager
def slow_writer(path: Path):
    """A producer writing `path` a half row at a time, a few rows a second, until the block
    ends; the file then holds complete rows and looks settled (its mtime set to an hour ago)."""
    stop = threading.Event()

    def write() -> None:
        with open(path, "w", encoding="utf-8") as out:
            for i, text in enumerate(sentences(4, 10_000)):
                row = json.dumps({"text": text}) + "\n"
                out.write(row[: len(row) // 2])
                out.flush()
                time.sleep(0.2)
                out.write(row[len(row) // 2 :])
                out.flush()
                if stop.is_set() and i >= 20:
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        stamp = time.time() - 3600
        os.utime(path, (stamp, stamp))


def run_logs(client, flow_run_id) -> list[str]:
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    )
    return [log.message for log in logs]


def model_versions(mlflow: MlflowClient) -> list:
    return sorted(
        mlflow.search_model_versions(f"name = '{EXPERIMENT}'"), key=lambda v: int(v.version)
    )


def pipeline_run(mlflow: MlflowClient, prefect_flow_run_ids: set[str]):
    """The MLflow parent run of one of these Prefect flow runs (or their experiment subflow)."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    for run in mlflow.search_runs([exp.experiment_id], "tags.stage = 'pipeline'"):
        if run.data.tags.get("prefect_flow_run_id") in prefect_flow_run_ids:
            return run
    return None


def frozen_train_files(mlflow: MlflowClient, run) -> list[str]:
    """The train files a pipeline run froze (its data/corpus_version.json), by name."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.download_artifacts(run.info.run_id, "data/corpus_version.json", tmp)
        record = json.loads(Path(local).read_text())
    return sorted(Path(f["url"]).name for f in record["files"] if "/incoming/" in f["url"])


class Scenario:
    """The servers, worker and clients of the story, and the waits it needs: a wait for
    something the server writes allows SQLITE_LOCK_WAIT_S on top of its own time, and every
    failure ends with the tails of the worker's and the Prefect server's logs."""

    def __init__(self, client, mlflow: MlflowClient, *, worker, logs: dict[str, Path], cli_env):
        self.client, self.mlflow, self.worker, self.logs = client, mlflow, worker, logs
        self.cli_env = cli_env  # for the prefect CLI: the API URL and PREFECT_HOME
        self.nightly = client.read_deployment_by_name(NIGHTLY)

    def tails(self) -> str:
        return "".join(
            f"\n--- {name} ---\n{path.read_text()[-5000:]}" for name, path in self.logs.items()
        )

    def nightly_runs(self) -> dict:
        runs = self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.nightly.id]))
        )
        return {r.id: r for r in runs}

    def run_and_wait(self, name: str, **parameters):
        flow_run = run_deployment(name, parameters=parameters or None, timeout=420, poll_interval=2)
        assert flow_run.state.is_completed(), f"{name}: {flow_run.state!r}" + self.tails()
        return flow_run

    def experiment_subflow_ids(self, flow_run_id) -> set[str]:
        children = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        return {str(flow_run_id)} | {str(c.id) for c in children}

    def pipeline_run(self, flow_run_id):
        """The MLflow parent run of a Prefect flow run of the nightly deployment."""
        return pipeline_run(self.mlflow, self.experiment_subflow_ids(flow_run_id))

    def logged(self, flow_run_ids: set, text: str) -> str:
        """The log line of these flow runs containing `text` (the API receives a run's logs
        in batches, possibly after it ended)."""
        return wait_for(
            lambda: next(
                (m for i in flow_run_ids for m in run_logs(self.client, i) if text in m), None
            ),
            30 + SQLITE_LOCK_WAIT_S,
            f"a log line with {text!r}" + self.tails(),
        )

    def watch(self, expected: str) -> str:
        """Run the watch deployment once; its log line containing `expected`."""
        return self.logged({self.run_and_wait(WATCH).id}, expected)

    def emitted(self) -> list:
        # (limit: the client's default, 100, is more than the server accepts)
        page = self.client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), limit=50)
        return sorted(page.events, key=lambda e: e.occurred)

    def triggered_run(self, known: set):
        """The run of the nightly deployment the event's trigger created."""
        new = wait_for(
            lambda: [r for i, r in self.nightly_runs().items() if i not in known],
            120 + SQLITE_LOCK_WAIT_S,
            "the triggered run" + self.tails(),
        )
        assert len(new) == 1, new
        return new[0]

    def state_when(self, flow_run_id, ready, what: str, timeout: float):
        """The flow run's state once `ready(state)` holds."""
        return wait_for(
            lambda: ready(s := self.client.read_flow_run(flow_run_id).state) and s,
            timeout,
            what + self.tails(),
        )

    def finished(self, flow_run_id, what: str):
        """The flow run, once final; it must have completed."""
        self.state_when(flow_run_id, lambda s: s.is_final(), what, 420)
        flow_run = self.client.read_flow_run(flow_run_id)
        assert flow_run.state.is_completed(), repr(flow_run.state) + self.tails()
        return flow_run


@contextlib.contextmanager
def scenario(tmp_path: Path):
    """Prefect and MLflow servers, the work pool and the two deployments of the test's config
    (write_config), a worker; yields the Scenario once they are up."""
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    base_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    client_env = {**base_env, "PREFECT_API_URL": api}
    worker_env = {
        **client_env,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "OMP_NUM_THREADS": "1",  # 2 shared cores: one torch thread per run
    }
    prefect = str(BIN / "prefect")
    logs = {"worker": tmp_path / "worker.log", "prefect server": tmp_path / "prefect-server.log"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(tracking_servers(tmp_path, base_env, prefect_port, mlflow_port))
        checked_cli([prefect, "work-pool", "create", POOL, "--type", "process"], client_env)
        prefect_yaml = write_prefect_yaml(tmp_path, write_config(tmp_path, mlflow_url))
        checked_cli(
            [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)],
            client_env,
        )
        worker = stack.enter_context(
            background([prefect, "worker", "start", "--pool", POOL], worker_env, logs["worker"])
        )
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))
        client = stack.enter_context(get_client(sync_client=True))
        mlflow = MlflowClient(mlflow_url)
        yield Scenario(client, mlflow, worker=worker, logs=logs, cli_env=client_env)


def the_first_run_registers_the_champion(s: Scenario) -> str:
    """1. Two train files: version A, version 1 is the champion. Returns A."""
    run_a = s.pipeline_run(s.run_and_wait(NIGHTLY).id)
    assert frozen_train_files(s.mlflow, run_a) == ["part-1.jsonl", "part-2.jsonl"]
    assert [v.version for v in model_versions(s.mlflow)] == ["1"]
    assert s.mlflow.get_model_version_by_alias(EXPERIMENT, "champion").version == "1"
    return run_a.data.tags["corpus_version"]


def the_watch_triggers_a_run_that_continues_the_champion(s: Scenario, version_a: str) -> str:
    """2. A third file has landed while a fourth is being written: the watch announces version
    B, and the trigger runs the nightly deployment on it. Returns B."""
    known = set(s.nightly_runs())
    s.watch(f"emitted {EVENT}")
    (event,) = wait_for(
        s.emitted, 30 + SQLITE_LOCK_WAIT_S, "the event in the server's event log" + s.tails()
    )
    assert event.resource.id == f"seqmodels.experiment.{EXPERIMENT}"
    version_b = event.payload["corpus_version"]
    assert event.payload["previous"] == version_a != version_b
    second = s.finished(s.triggered_run(known).id, "the triggered run to finish")
    assert second.parameters["experiments"] == [EXPERIMENT]
    assert second.created_by.type == "AUTOMATION"  # the deployment's trigger
    run_b = s.pipeline_run(second.id)
    assert run_b.data.tags["corpus_version"] == version_b
    # The file being written was left for a later run, not read half-written.
    assert frozen_train_files(s.mlflow, run_b) == ["part-1.jsonl", "part-2.jsonl", "part-3.jsonl"]
    # A challenger continued from the champion, registered as version 2, with the
    # champion/challenger decision naming both corpus versions.
    assert [v.version for v in model_versions(s.mlflow)] == ["1", "2"]
    v2 = s.mlflow.get_model_version(EXPERIMENT, "2")
    assert v2.tags["train_from"] == "champion"
    assert v2.tags["init_from"] == f"models:/{EXPERIMENT}/1"
    assert v2.tags["corpus_version"] == version_b
    assert v2.tags["promotion.decision"] in ("promoted", "not promoted")
    assert v2.tags["promotion.challenger_corpus_version"] == version_b
    assert v2.tags["promotion.champion_corpus_version"] == version_a
    return version_b


def nothing_new_trains_nothing(s: Scenario, version_b: str) -> None:
    """3. Nothing lands (the fourth file is still being written): the watch emits nothing,
    and a run of the nightly deployment trains nothing."""
    s.watch(f"corpus version {version_b} unchanged")
    third = s.run_and_wait(NIGHTLY)
    s.logged(s.experiment_subflow_ids(third.id), "no new data since run")
    assert [v.version for v in model_versions(s.mlflow)] == ["1", "2"]
    assert len(s.emitted()) == 1


def a_second_announcement_waits_for_the_running_one(s: Scenario, known: set, running):
    """While a triggered run runs, the change is announced again (as a second watch would):
    the trigger's run of it must wait for the slot, not be dropped or run beside it. Returns
    the queued run."""
    (latest,) = s.emitted()[-1:]
    emitter = subprocess.Popen(
        [str(BIN / "prefect"), "event", "emit", EVENT, "--resource-id", latest.resource.id]
        + ["--payload", json.dumps(latest.payload)],
        env=s.cli_env,
        stdout=subprocess.DEVNULL,
    )
    queued = s.triggered_run(known | {running.id})
    assert queued.created_by.type == "AUTOMATION"
    assert emitter.wait(timeout=60 + SQLITE_LOCK_WAIT_S) == 0
    # The worker offers it and the server holds it back: the first run has the slot.
    waiting = s.state_when(
        queued.id,
        lambda st: st.name == "AwaitingConcurrencySlot",
        "the second triggered run to wait for the slot",
        60 + SQLITE_LOCK_WAIT_S,
    )
    assert waiting.is_scheduled(), waiting
    assert s.client.read_flow_run(running.id).state.is_running(), s.tails()
    return queued


def kill_while_training(s: Scenario, flow_run, checkpoints: Path, before: set) -> tuple:
    """SIGKILL the worker's flow-run process once it has written a checkpoint; wait for the
    server to mark the run crashed. Returns the last step it checkpointed and its state."""
    new_checkpoints = wait_for(
        lambda: set(checkpoints.glob("*/checkpoints/step-*.pt")) - before,
        300,
        "a checkpoint of the triggered run" + s.tails(),
    )
    kill_flow_run_process(s.worker.pid, s.tails)
    assert new_checkpoints
    state = s.state_when(
        flow_run.id, lambda st: st.is_final(), "the killed run to be marked final",
        120 + SQLITE_LOCK_WAIT_S,
    )  # fmt: skip
    assert state.type == StateType.CRASHED, state
    # The last checkpoint the killed run wrote: it trains on while the kill is on its way
    # (tiny steps, a hundred a second), so this is read once the process is dead.
    written = set(checkpoints.glob("*/checkpoints/step-*.pt")) - before
    return max(int(p.stem.split("-")[1]) for p in written), state


def a_killed_run_is_resumed_by_the_run_queued_behind_it(s: Scenario, checkpoints: Path) -> None:
    """4. The fourth file is complete: version C, and the trigger starts a run. A second
    announcement queues behind it; the first run is killed while it trains, and the queued
    run resumes that training and registers version 3."""
    before = set(checkpoints.glob("*/checkpoints/step-*.pt"))
    known = set(s.nightly_runs())
    s.watch(f"emitted {EVENT}")
    killed = s.triggered_run(known)
    assert killed.created_by.type == "AUTOMATION"
    s.state_when(
        killed.id, lambda st: st.is_running(), "the triggered run to start",
        120 + SQLITE_LOCK_WAIT_S,
    )  # fmt: skip
    queued = a_second_announcement_waits_for_the_running_one(s, known, killed)
    killed_at, crashed = kill_while_training(s, killed, checkpoints, before)
    assert killed_at < 800, "the kill landed after training ended: nothing to resume"
    assert [v.version for v in model_versions(s.mlflow)] == ["1", "2"]

    resumed = s.finished(queued.id, "the queued run to finish")
    assert resumed.start_time >= crashed.timestamp  # it waited for the killed run
    run_c = s.pipeline_run(resumed.id)
    assert frozen_train_files(s.mlflow, run_c) == [f"part-{i}.jsonl" for i in range(1, 5)]
    assert [v.version for v in model_versions(s.mlflow)] == ["1", "2", "3"]
    v3 = s.mlflow.get_model_version(EXPERIMENT, "3")
    training = s.mlflow.get_run(v3.run_id)
    assert 10 <= training.data.metrics["resumed_from_step"] <= killed_at
    assert v3.tags["corpus_version"] == run_c.data.tags["corpus_version"]
    assert len(s.emitted()) == 3


@pytest.mark.e2e
def test_a_new_file_triggers_a_run_that_continues_the_champion_on_real_servers(tmp_path):
    incoming = tmp_path / "incoming"
    write_rows(incoming, "part-1.jsonl", sentences(1, 60))
    write_rows(incoming, "part-2.jsonl", sentences(2, 60))
    started = time.monotonic()

    with scenario(tmp_path) as s:
        version_a = the_first_run_registers_the_champion(s)
        write_rows(incoming, "part-3.jsonl", sentences(3, 40))
        with slow_writer(incoming / "part-4.jsonl"):
            version_b = the_watch_triggers_a_run_that_continues_the_champion(s, version_a)
            nothing_new_trains_nothing(s, version_b)
        a_killed_run_is_resumed_by_the_run_queued_behind_it(
            s, checkpoints=tmp_path / "work" / EXPERIMENT / "models"
        )
    print(f"continuous training on real servers: {time.monotonic() - started:.0f} s")
