#!/usr/bin/env bash
# Quickstart command 2: set up, then run the test suite (the same command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
# A loaded 2-core machine can take longer than the default 20 s to start the local API.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
# Two worker processes, a test file per worker (module fixtures stay together): the long
# tests spend most of their time waiting on real Prefect/MLflow servers and subprocesses, so
# two workers finish in about 70% of the serial time on 2 cores. SEQMODELS_TEST_WORKERS=0 runs
# serially.
.venv/bin/python -m pytest -q -n "${SEQMODELS_TEST_WORKERS:-2}" --dist loadfile "$@"
