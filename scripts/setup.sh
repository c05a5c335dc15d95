#!/usr/bin/env bash
# Creates .venv (if missing) and installs posttrain with its test tools.
# torch is pinned to the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The code-execution sandbox prefers bubblewrap (namespaces without privileges); it falls
# back to unshare / rlimits when bwrap is absent, so a failed install is only a warning.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
    || echo "warning: could not install bubblewrap; the sandbox will use unshare/rlimits" >&2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# peft too, so the LoRA paths (adapter-disabled reference, native sampler on LoRA layers) are tested;
# bench (TRL) so that the tests proving our GRPO update equals TRL's run (tests/e2e/test_bench.py).
python -m pip install -q -e ".[test,peft,bench]"
