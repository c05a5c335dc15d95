"""The prompt source: which prompts each step sees, with a resumable position."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError


@dataclass
class PromptItem:
    """One prompt: id, raw text (what rewards see), templated token ids, answer, extra columns."""

    id: str
    text: str
    prompt_ids: list[int]
    answer: str
    difficulty: int
    columns: dict[str, Any]


class PromptSource:
    """Which prompts each step sees, with a JSON-serialisable resumable position.

    selection:
      "shuffle": epochs over a seeded permutation (state: epoch, position).
      "curriculum": data.selection.Curriculum — easy→hard levels opened over `total_steps`
        (stateless: draws depend on (seed, step, refill round)).
      "success_rate": data.selection.SuccessRateSampler — Kimi k1.5 sampling ∝ 1 − success
        rate, solved prompts retired (`update` feeds back per-sample success).
    """

    def __init__(self, items: list[PromptItem], *, selection: str, seed: int, total_steps: int = 1):
        if not items:
            raise ConfigError("data: no training prompts (empty dataset or all prompts skipped)")
        self.items = items
        self.selection = selection
        self.seed = seed
        self.total_steps = total_steps
        self.epoch = 0
        self.position = 0
        self._order = self._make_order()
        self._sampler = None
        self._curricula: dict[int, Any] = {}
        if selection == "success_rate":
            from posttrain.data.selection import SuccessRateSampler

            self._sampler = SuccessRateSampler([it.id for it in items], seed=seed)
        self._index = {it.id: i for i, it in enumerate(items)}

    def _make_order(self) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        return order

    def _curriculum(self, round_: int):
        if round_ not in self._curricula:
            from posttrain.data.selection import Curriculum

            # One sampler per refill round, so a refill draws different prompts than round 0.
            self._curricula[round_] = Curriculum(
                [it.difficulty for it in self.items], self.total_steps, seed=self.seed + 7919 * round_
            )
        return self._curricula[round_]

    def next(self, n: int, step: int = 0, round_: int = 0) -> list[int]:
        """Indices of the next n prompts (for RL step `step`, generation round `round_`)."""
        if self._sampler is not None:
            return [self._index[i] for i in self._sampler.sample(n)]
        if self.selection == "curriculum":
            return list(self._curriculum(round_).sample(step, n))
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._make_order()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def get(self, indices: list[int]) -> list[PromptItem]:
        """The items at `indices` (as returned by `next`)."""
        return [self.items[i] for i in indices]

    def update(self, indices: list[int], successes: list[float]) -> None:
        """Feed back per-sample success (success-rate sampling); a no-op otherwise."""
        if self._sampler is not None:
            self._sampler.update([self.items[i].id for i in indices], successes)

    def state_dict(self) -> dict:
        """JSON-serialisable position (epoch, position, success-rate sampler state)."""
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        if self._sampler is not None:
            state["sampler"] = self._sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by `state_dict()`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()
        if self._sampler is not None and "sampler" in state:
            self._sampler.load_state_dict(state["sampler"])
