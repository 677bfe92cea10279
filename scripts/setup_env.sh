#!/usr/bin/env bash
# Creates .venv (once) with the pinned CPU PyTorch first, then the library and its test extra.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
printf 'torch==%s\n' "$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" > .venv/torch-constraint.txt
.venv/bin/python -m pip install --quiet --constraint .venv/torch-constraint.txt -e ".[test]"
