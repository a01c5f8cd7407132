#!/usr/bin/env bash
# Regenerates requirements/lock.txt from pyproject.toml (run after changing dependencies).
# The lock leaves torch out: scripts/setup.sh installs the CPU build on CPU machines and the
# normal (CUDA) build on GPU machines, then installs this lock on top with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_CACHE_DIR="${UV_CACHE_DIR:-$PWD/.cache/uv}"
.venv/bin/uv pip compile pyproject.toml --extra dev \
  --override requirements/overrides.txt \
  --constraint requirements/torch-cpu.txt \
  --find-links /opt/wheels \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --no-emit-package torch --no-emit-package hrm-pipeline \
  --no-header --annotation-style line \
  -o requirements/lock.txt
