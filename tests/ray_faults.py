"""Rewards for the Ray backend's fault tests (imported by the rewards actor as
"ray_faults:<factory>"; no tests here)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from rl_common import digit_fraction


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
