#!/usr/bin/env bash
# Creates a virtualenv and installs posttrain with its test tools and every CPU extra.
#
#   bash scripts/setup.sh            # .venv, exactly the versions of requirements/lock.txt
#   bash scripts/setup.sh --latest   # .venv-latest, the newest versions pyproject.toml allows
#
# torch is pinned to the CPU wheel first (TORCH_VERSION, default 2.13.0) in both modes: an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MODE=locked
if [ "${1:-}" = "--latest" ]; then MODE=latest; fi
VENV=${POSTTRAIN_VENV:-$([ "$MODE" = latest ] && echo .venv-latest || echo .venv)}
# The code-execution sandbox prefers bubblewrap (namespaces without privileges); it falls
# back to unshare / rlimits when bwrap is absent, so a failed install is only a warning.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
    || echo "warning: could not install bubblewrap; the sandbox will use unshare/rlimits" >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$TORCH_VERSION"
# peft: the LoRA paths; bench (TRL): the tests proving our GRPO update equals TRL's;
# track, ray: their code paths. `all` is every extra that works without a GPU.
if [ "$MODE" = latest ]; then
  python -m pip install -q --upgrade --upgrade-strategy eager -c <(echo "torch==$TORCH_VERSION") -e ".[test,all]"
else
  python -m pip install -q -c requirements/lock.txt -e ".[test,all]"
fi
