#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (pass pytest options through, e.g. -k export).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q "$@"
