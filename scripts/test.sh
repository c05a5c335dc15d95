#!/usr/bin/env bash
# Fresh machine -> installed package -> the default test suite (slow and gpu tests excluded).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -m "not slow and not gpu" -q "$@"
