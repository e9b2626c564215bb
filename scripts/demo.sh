#!/usr/bin/env bash
# Set up the environment, then run the main job: `mbldm demo` (extra arguments are passed through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/mbldm demo "$@"
