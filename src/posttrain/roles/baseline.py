"""The REINFORCE running-mean baseline, controller state saved in checkpoints."""

from __future__ import annotations

import math


class RunningMean:
    """EMA of past mean scores: the REINFORCE baseline b (Williams 1992), resumable.

    momentum: b ← momentum·b + (1 − momentum)·mean(scores); the first update sets b.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.value = 0.0
        self.initialised = False

    def update(self, mean_score: float) -> None:
        """Fold this batch's mean score into b (a non-finite mean is ignored)."""
        if not math.isfinite(mean_score):
            return
        if not self.initialised:
            self.value, self.initialised = mean_score, True
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * mean_score

    def state_dict(self) -> dict:
        """JSON-serialisable state for checkpoints."""
        return {"value": self.value, "initialised": self.initialised}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.value, self.initialised = float(state["value"]), bool(state["initialised"])
