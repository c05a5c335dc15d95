"""The contract every synthetic verifiable task follows.

A task turns a seed into examples. Solutions use the R1 format that the char tokenizer
knows as special tokens: ``<think>{reasoning steps}</think><answer>{answer}</answer>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Example:
    """One task instance.

    id: stable, unique within the task ("arith-train-000042").
    prompt: the question as the user would ask it (no chat template applied).
    answer: the ground-truth final answer, as a string ("42", "3/4", "1 2 3").
    difficulty: 1 (easiest) .. task's max level.
    solution: a correct reference solution in <think>..</think><answer>..</answer> form.
    wrong_solution: a plausible incorrect solution in the same form (for preference pairs).
    steps: the reasoning steps of `wrong_solution`'s trace... see step_labels.
    step_labels: per step of `steps`, True while the reasoning is still correct
        (PRM training data; the first False marks the first wrong step).
    """

    id: str
    prompt: str
    answer: str
    difficulty: int
    solution: str
    wrong_solution: str
    steps: list[str] = field(default_factory=list)
    step_labels: list[bool] = field(default_factory=list)

    def to_row(self) -> dict:
        return asdict(self)
