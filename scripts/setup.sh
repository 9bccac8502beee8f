#!/usr/bin/env bash
# Create .venv and install seqmodels. torch goes first: a CPU build of torch 2.13.0 where
# pip can find one, else whatever torch pip picks (CUDA machines get their CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0 || .venv/bin/python -m pip install -q torch
fi
.venv/bin/python -m pip install -q -e '.[dev,hf,export]'
