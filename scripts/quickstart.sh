#!/usr/bin/env bash
# Quickstart command 1: set up, then run the default pipeline end to end on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
# A loaded 2-core machine can take longer than the default 20 s to start the local API.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
.venv/bin/seqmodels run --config "${1:-configs/default.yaml}"
