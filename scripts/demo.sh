#!/usr/bin/env bash
# Fresh machine -> installed package -> the CPU demo (SFT warm start -> GRPO -> before/after eval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
posttrain demo "$@"
