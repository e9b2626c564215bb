#!/usr/bin/env bash
# Create .venv (if needed) and install mbldm with its test dependencies. Idempotent.
# torch: a CPU-only machine gets torch==2.13.0 (CPU build); if a torch is already importable in .venv (e.g. a CUDA
# build you installed first: `.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124`),
# it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
stamp=.venv/.mbldm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
