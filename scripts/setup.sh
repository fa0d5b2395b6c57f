#!/usr/bin/env bash
# One-command setup: a venv in .venv with torch 2.14.1 + torchvision 0.29.1, pyprune (editable) with its test
# extras, and the compiled extension pyprune._C (C++ always; CUDA kernels too when nvcc is found).
#   bash scripts/setup.sh            # PYTHON=python3.11 VENV=.venv PYPRUNE_NO_CUDA=1 to change the defaults
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 and build tools"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" ninja pybind11

# torch guesses CUDA_HOME from the first nvcc on PATH; point it at the toolkit that matches torch's CUDA 13 build.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda-13.0
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

echo "[setup] building and installing pyprune (CUDA_HOME=${CUDA_HOME:-none}, arch list $TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
echo "[setup] build took $(( $(date +%s) - start )) s"

# A setup that silently fell back to the pure-torch backend would hide kernel failures from the tests.
"$PY" - <<'PYCHECK'
import pyprune.kernels as k
if not k.extension_available():
    raise SystemExit("[setup] ERROR: pyprune._C did not build or import; see the pip output above")
print(f"[setup] pyprune._C loaded; backend = {k.backend()}")
PYCHECK
echo "[setup] done. Test with: $VENV/bin/python -m pytest"
