#!/usr/bin/env bash
# Fresh machine -> installed package -> the default test suite (slow and gpu tests excluded).
#
#   bash scripts/test.sh [pytest args]            # the locked versions (requirements/lock.txt)
#   bash scripts/test.sh --latest [pytest args]   # the newest versions pyproject.toml allows, in
#                                                 # .venv-latest: upstream drift shows up as a failure
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=()
if [ "${1:-}" = "--latest" ]; then MODE=(--latest); shift; fi
bash scripts/setup.sh "${MODE[@]}"
if [ ${#MODE[@]} -gt 0 ]; then . "${POSTTRAIN_VENV:-.venv-latest}/bin/activate"; else . "${POSTTRAIN_VENV:-.venv}/bin/activate"; fi
python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|datasets|trl|peft) ' | tr -s ' ' | paste -sd ',' \
  | sed 's/^/versions: /'
ruff check src tests benchmarks
python -m pytest -m "not slow and not gpu" -q "$@"
