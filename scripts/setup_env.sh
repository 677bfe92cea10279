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
# The Slicer-side tests: slicer-layer-dm (trame-slicer's slice views) pins an older slicer-core than
# the test extra's, so it is installed without its dependencies.
if ! .venv/bin/python -c "import slicer_layer_dm" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --no-deps "slicer-layer-dm>=2.0,<3"
fi
# Offscreen rendering of the picture tests (VTK through EGL, Mesa's software driver): Debian packages,
# installed only when missing and only where apt-get can run.
RENDER_PACKAGES="libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri"
if command -v dpkg >/dev/null && ! dpkg -s $RENDER_PACKAGES >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $RENDER_PACKAGES >/dev/null
    else
        echo "setup_env.sh: install $RENDER_PACKAGES (apt-get, as root) for the rendering tests" >&2
    fi
fi
