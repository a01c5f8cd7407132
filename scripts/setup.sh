#!/usr/bin/env bash
# One-time (idempotent) setup: a project-local virtualenv in .venv with the locked dependencies.
#   CPU machine: torch 2.13.0 CPU build (never the multi-GB CUDA build).
#   GPU machine (nvidia-smi sees a device): the registry's default torch build.
# Everything else comes from requirements/lock.txt, installed exactly (--no-deps) with uv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export UV_CACHE_DIR="${UV_CACHE_DIR:-$ROOT/.cache/uv}"
PY="${PYTHON:-python3}"
UV_VERSION=0.13.9
STAMP=.venv/.hrm-setup-stamp
want="$(cat requirements/lock.txt requirements/torch-cpu.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating/updating .venv (uv cache: $UV_CACHE_DIR)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
UV=".venv/bin/uv"
export VIRTUAL_ENV="$ROOT/.venv"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found: installing the default torch build"
  .venv/bin/python -c "import torch" 2>/dev/null || "$UV" pip install torch
else
  TORCH_PIN="$(cat requirements/torch-cpu.txt)"
  if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__=='${TORCH_PIN#torch==}' else 1)" 2>/dev/null; then
    echo "[setup] CPU machine: installing $TORCH_PIN"
    if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
      "$UV" pip install --no-deps --find-links /opt/wheels "$TORCH_PIN"
    else
      "$UV" pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "$TORCH_PIN"
    fi
  fi
fi
# Build tools first: deepspeed ships only as an sdist whose setup.py imports torch, so it is built
# against the torch installed above (no build isolation, which would fetch another torch).
"$UV" pip install --no-deps $(grep -E '^(setuptools|packaging|ninja|py-cpuinfo|psutil|numpy)==' requirements/lock.txt | cut -d' ' -f1)
"$UV" pip install --no-deps --no-build-isolation-package deepspeed -r requirements/lock.txt
"$UV" pip install --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "[setup] done: $(.venv/bin/python -c 'import torch,prefect,deepspeed;print("torch",torch.__version__,"prefect",prefect.__version__,"deepspeed",deepspeed.__version__)' 2>/dev/null | tail -1)"
