#!/usr/bin/env bash
# Create .venv with the CPU build of torch and napari-sam2 installed in it.
#   bash scripts/setup.sh          # the plugin with napari (PyQt6)
#   bash scripts/setup.sh --dev    # plus the test tools and Meta's reference (parity tests)
set -euo pipefail
cd "$(dirname "$0")/.."
# the interpreter to build the venv from: $PYTHON, else python3, else python
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PYTHON" ]; then echo "error: no python3 or python on PATH; install Python 3.10+ or set PYTHON" >&2; exit 1; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
echo "torch==2.13.0" > .venv/constraints.txt
# keep pip from swapping torch for a multi-GB CUDA build; set NAPARI_SAM2_TORCH to choose another
if [ -n "${NAPARI_SAM2_TORCH:-}" ]; then echo "$NAPARI_SAM2_TORCH" > .venv/constraints.txt; fi
export PIP_CONSTRAINT="$PWD/.venv/constraints.txt"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q "$(cat .venv/constraints.txt)"
if [ "${1:-}" = "--dev" ]; then
    $PY -m pip install -q -e ".[testing,reference]"
    # Meta's reference is an sdist whose build wants CUDA; build it without
    $PY -m pip install -q setuptools wheel
    SAM2_BUILD_CUDA=0 $PY -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
else
    $PY -m pip install -q -e ".[testing]"
fi
echo "napari-sam2 is installed in .venv"
