"""Sorting and reversal of short digit or letter lists.

"Sort: 3 1 2" → "<think>1; 2; 3</think><answer>1 2 3</answer>": each step emits the next
output item (the smallest remaining one for sort, the last remaining one for reverse).
Difficulty sets the list length: levels 1..5 → 3, 4, 5, 6, 8 items.

The wrong solution swaps two adjacent, different output items (a classic slip); the
steps from the first misplaced item on are labelled False. Lists whose output has no two
adjacent different items (all items equal) are never drawn.
"""

from __future__ import annotations

import random
import string

from posttrain.data.tasks.base import Problem, Task
from posttrain.errors import ConfigError

LENGTHS = {1: 3, 2: 4, 3: 5, 4: 6, 5: 8}
ALPHABETS = {"digits": string.digits, "letters": string.ascii_lowercase}
OPERATIONS = ("sort", "reverse")


def _items(text: str) -> list[str]:
    return text.replace(",", " ").split()


class Sorting(Task):
    """Sort ascending or reverse a list of single characters.

    items: "digits", "letters" or "mixed" (each problem picks digits or letters).
    operations: which of "sort", "reverse" to draw from.
    """

    name = "sorting"
    max_difficulty = 5

    def __init__(
        self, *, items: str = "mixed", operations: tuple[str, ...] | list[str] = OPERATIONS, **options
    ):
        super().__init__(**options)
        if items not in ("digits", "letters", "mixed"):
            raise ConfigError(f"task 'sorting': items must be 'digits', 'letters' or 'mixed', got {items!r}")
        bad = [op for op in operations if op not in OPERATIONS]
        if bad or not operations:
            raise ConfigError(
                f"task 'sorting': operations must be a non-empty subset of {OPERATIONS}, got {operations!r}"
            )
        self.items = items
        self.operations = tuple(operations)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw a list of LENGTHS[difficulty] items and one operation; see the module docstring."""
        kind = self.items if self.items != "mixed" else rng.choice(("digits", "letters"))
        op = rng.choice(self.operations)
        while True:
            values = [rng.choice(ALPHABETS[kind]) for _ in range(LENGTHS[difficulty])]
            out = sorted(values) if op == "sort" else values[::-1]
            swappable = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
            if swappable:
                break
        k = rng.choice(swappable)
        wrong = list(out)
        wrong[k], wrong[k + 1] = wrong[k + 1], wrong[k]
        listed = " ".join(values)
        return Problem(
            key=f"{op}:{listed}",
            prompt=f"{'Sort' if op == 'sort' else 'Reverse'}: {listed}",
            answer=" ".join(out),
            final=" ".join(out),
            steps=list(out),
            wrong_steps=wrong,
            wrong_labels=[i < k for i in range(len(out))],
            wrong_final=" ".join(wrong),
        )

    def check(self, predicted: str, answer: str) -> bool:
        """Item sequences equal, separators (spaces/commas) ignored."""
        # Items may be separated by spaces or commas; case and order must match exactly.
        return _items(predicted) == _items(answer)
