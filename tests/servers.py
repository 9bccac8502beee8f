"""Real servers and processes for the integration tests: free ports, long-running
subprocesses in their own process group, health checks, /proc lookups, and a Prefect server
beside an MLflow server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background(args: list[str], env: dict, log: Path):
    """A long-running subprocess in its own process group (servers start children of their
    own), stopped with SIGTERM, then SIGKILL, however the test ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            # Whatever is left of the group: a stuck child, or all of it after 30 s.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until `url` answers; fail with the end of `log` if `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{url} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def checked_cli(args: list[str], env: dict) -> str:
    """Run a command (prefect, mlflow) from the repository root; its stdout, or fail."""
    result = subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    children.append(int(entry.name))
    return children + [d for c in children for d in descendants(c)]


def cmdline(pid: int) -> str:
    """The command line of `pid`, or "" once it is gone."""
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def kill_flow_run_process(worker_pid: int, logs=lambda: "") -> None:
    """SIGKILL the process executing a worker's flow run (its child running Prefect's engine),
    as an out-of-memory kill or a lost machine would; `logs()` is shown if there is none."""
    procs = [p for p in descendants(worker_pid) if "prefect" in cmdline(p)]
    engine = [p for p in procs if "engine" in cmdline(p)] or procs
    assert engine, "no flow-run process under the worker" + logs()
    os.kill(engine[0], signal.SIGKILL)


def wait_for(predicate, timeout: float, what: str):
    """The first truthy value of `predicate()`, polled for `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@contextlib.contextmanager
def tracking_servers(tmp_path: Path, env: dict, prefect_port: int, mlflow_port: int):
    """A `prefect server` and an `mlflow server` (SQLite + a local artefact root under
    tmp_path) on 127.0.0.1, started at once (each takes 5-30 s on a busy 2-core machine) and
    healthy when this yields; both stopped however the test ends."""
    with contextlib.ExitStack() as stack:
        prefect_log = tmp_path / "prefect-server.log"
        prefect_server = stack.enter_context(
            background(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
                + ["--port", str(prefect_port)],
                env,
                prefect_log,
            )
        )
        mlflow_log = tmp_path / "mlflow-server.log"
        mlflow_server = stack.enter_context(
            background(
                [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1"]
                + ["--port", str(mlflow_port)]
                + ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
                + ["--default-artifact-root", (tmp_path / "mlflow-artifacts").as_uri()],
                {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                mlflow_log,
            )
        )
        wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", prefect_server, prefect_log)
        wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", mlflow_server, mlflow_log)
        yield
