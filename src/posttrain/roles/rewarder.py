"""The rewarder role: the weighted sum of the configured rewards, each under its deadline."""

from __future__ import annotations

from typing import Any

import torch


class RewardRole:
    """The weighted reward sum of `cfg.rewards`, with rewards that switch on at a step.

    specs: list of (name, fn, weight, start_step). A reward whose start_step is in the
    future is left out of the runner for that step (Kimi k1.5 enables its length reward
    late), so it neither costs time nor changes the score.

    dense: the indices into specs of the dense rewards (`data.rewards.is_dense`: the prm
    reward with dense=true, or a "module:function" reward with `fn.dense = True`). A dense
    reward is not part of the summed score: `dense` returns its per-step scores and step end
    offsets (`fn.scored_steps`), which the loop turns into token rewards. It runs in the
    caller's thread, without the runner's deadline: an error in it raises instead of
    excluding samples.
    """

    def __init__(
        self,
        specs: list[tuple[str, Any, float, int]],
        *,
        dense: frozenset[int] = frozenset(),
        timeout_s: float,
        max_workers: int,
        max_error_rate: float,
    ):
        from posttrain.data.rewards import RewardRunner

        self._runner_cls = RewardRunner
        self.specs = specs
        self.dense_indices = dense
        self.options = {"timeout_s": timeout_s, "max_workers": max_workers, "max_error_rate": max_error_rate}
        self._runners: dict[tuple[str, ...], Any] = {}

    def configured(self) -> bool:
        """Whether any reward is configured (pure distillation runs have none)."""
        return bool(self.specs)

    def active(self, step: int) -> list[tuple[str, Any, float, int]]:
        """The reward specs that count at `step` (start_step <= step)."""
        return [s for s in self.specs if step >= s[3]]

    def _active(self, step: int, dense: bool) -> list[tuple[str, Any, float, int]]:
        return [s for k, s in enumerate(self.specs) if step >= s[3] and (k in self.dense_indices) == dense]

    def has_dense(self, step: int) -> bool:
        """Whether a dense reward is active at `step`."""
        return bool(self._active(step, dense=True))

    def dense(self, prompts: list[str], completions: list[str], step: int):
        """[(name, weight, step scores, step ends)] of the dense rewards active at `step`:
        per completion, PRM(x, y≤t) for each step t and the step's end offset in the
        completion's characters (lists of equal length; empty without steps)."""
        out = []
        for name, fn, weight, _ in self._active(step, dense=True):
            scores, ends = fn.scored_steps(prompts, completions)
            out.append((name, weight, scores, ends))
        return out

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list], step: int):
        """RewardResult of the scalar rewards active at `step` (scores [B], NaN where
        excluded); all zeros and valid when only dense rewards are active."""
        active = self._active(step, dense=False)
        if not active:
            from posttrain.data.rewards.runner import RewardResult

            b = len(completions)
            return RewardResult(torch.zeros(b), {}, torch.ones(b, dtype=torch.bool), {})
        key = tuple(s[0] for s in active)
        if key not in self._runners:
            self._runners[key] = self._runner_cls([(n, f, w) for n, f, w, _ in active], **self.options)
        return self._runners[key].score(prompts, completions, columns)

    def close(self) -> None:
        """Release the runners' reward workers."""
        for runner in self._runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()
