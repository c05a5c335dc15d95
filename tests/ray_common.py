"""Shared helpers of the Ray backend tests (no tests here): the module-wide local Ray
instance, and a reward that kills the rewards actor (imported there as
"ray_common:killed_once")."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from rl_common import digit_fraction

TESTS = Path(__file__).resolve().parent


def local_ray_instance(ray):
    """Start a local Ray instance of 2 CPUs whose workers import from tests/ (for
    "module:function" rewards), yield, shut it down: the body of a module-scoped fixture."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})  # fmt: skip
    yield
    ray.shutdown()


def killed_once(marker: str, on_call: int):
    """digit_fraction, except that on its `on_call`-th call in a process the reward SIGKILLs
    the process it runs in (the rewards actor, mid-call) — once: it first creates `marker`,
    and a process that finds the marker never kills itself."""
    calls = {"n": 0}

    def reward(prompts, completions, **columns):
        calls["n"] += 1
        if calls["n"] == on_call and not Path(marker).exists():
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return digit_fraction(prompts, completions, **columns)

    return reward
