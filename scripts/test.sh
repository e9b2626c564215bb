#!/usr/bin/env bash
# Set up the environment, then run the test suite (CPU; extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
