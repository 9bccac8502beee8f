"""Running the real `seqmodels` CLI in a subprocess, as the end-to-end tests do: an
environment of its own (corpus mirror, temporary MLflow store and Prefect home) and a run
that must succeed, its output shown when it does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CLI = [sys.executable, "-m", "flows.cli"]


def cli_env(tmp_path: Path, mirror: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: MLflow in tmp_path/mlflow.db, Prefect in tmp_path."""
    return {
        **os.environ,
        "SEQMODELS_MIRROR": str(mirror),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONPATH": str(REPO),
        "COLUMNS": "200",
        **extra,
    }


def run_checked(
    args: list[str], cwd: Path, env: dict, stdin: str | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run ARGS (e.g. [*CLI, "run", ...]) in cwd; fails the test with the end of its output
    unless it exits 0."""
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result
