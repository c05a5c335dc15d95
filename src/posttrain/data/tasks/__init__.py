"""Synthetic verifiable tasks: a registry, and rows in every dataset format.

>>> task = get_task("arithmetic")
>>> ex = task.examples("train", n=2, seed=0, difficulty=1)[0]
>>> task.score(ex.solution, ex.answer), task.score(ex.wrong_solution, ex.answer)
(1.0, 0.0)

`task_rows` turns examples into the same row dicts `posttrain.data.datasets.load_rows`
returns, so trainers read synthetic tasks and user files through one format.
"""

from __future__ import annotations

import inspect

from posttrain.core.registry import Registry
from posttrain.data.tasks.arithmetic import Arithmetic
from posttrain.data.tasks.base import (
    SPLITS,
    STEP_SEPARATOR,
    Example,
    Task,
    extract_answer,
    format_solution,
    split_of,
)
from posttrain.data.tasks.countdown import Countdown
from posttrain.data.tasks.sorting import Sorting
from posttrain.data.tasks.tool_arithmetic import ToolArithmetic
from posttrain.data.tasks.word_problems import WordProblems
from posttrain.errors import ConfigError

__all__ = [
    "STEP_SEPARATOR",
    "SPLITS",
    "TASKS",
    "ROW_KINDS",
    "Example",
    "Task",
    "extract_answer",
    "format_solution",
    "get_task",
    "split_of",
    "task_rows",
]

TASKS: Registry = Registry("task")
for _cls in (Arithmetic, Countdown, Sorting, WordProblems, ToolArithmetic):
    TASKS.register(_cls.name)(_cls)

ROW_KINDS = ("prompt", "completion", "messages", "preference", "stepwise", "scored", "ranked")


def _option_names(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__:
        if klass is object:
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    return sorted(names)


def get_task(name: str, **options) -> Task:
    """The task registered as `name`, built with its keyword options.

    Unknown task names raise ConfigError listing the valid ones; unknown options raise
    ConfigError listing the task's options.
    """
    cls = TASKS[name]
    valid = _option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"task {name!r} has no option {unknown[0]!r}; valid options: {', '.join(valid)}")
    return cls(**options)


def partial_credit(ex: Example) -> float:
    """Score of an example's wrong solution: the share of its reasoning steps labelled right
    (the steps before the first slip), in [0, 1); 0 for a trace without steps."""
    return sum(ex.step_labels) / len(ex.step_labels) if ex.step_labels else 0.0


def task_rows(
    task: Task | str,
    split: str,
    n: int,
    seed: int = 0,
    kind: str = "prompt",
    difficulty: int | None = None,
) -> list[dict]:
    """Dataset rows built from `n` examples of a task, in the format of `kind`.

    Every row carries the columns ``id``, ``answer``, ``difficulty`` and ``task`` next to
    the format's own columns (extra columns reach reward functions as keyword arguments):

    - "prompt": ``prompt`` and ``solution`` (RL; rewards compare against ``answer``, and
      step_credit against the reference ``solution``).
    - "completion": ``prompt``, ``completion`` = the reference solution (SFT).
    - "messages": ``messages`` = [user prompt, assistant solution] (conversational SFT).
    - "preference": ``prompt``, ``chosen`` = solution, ``rejected`` = wrong solution (RM/DPO).
    - "stepwise": TRL-style ``prompt``, ``completions`` (list of reasoning steps, to be
      joined with STEP_SEPARATOR inside <think>) and ``labels`` (one bool per step). Two
      rows per example: the wrong trace (``trace`` = "wrong", labels False from the first
      wrong step) and the reference trace (``trace`` = "correct", all True) — 2n rows.
    - "scored": ``prompt``, ``completion``, ``score`` (pointwise RM). Two rows per example:
      the solution with score 1 and the wrong solution with its partial credit, the share
      of its reasoning steps that are still right (`partial_credit`) — 2n rows.
    - "ranked": ``prompt``, ``completions`` = [solution, wrong solution] and ``scores`` =
      [1, partial credit] (N-best preferences with K = 2; files can hold any K).
    """
    if isinstance(task, str):
        task = get_task(task)
    if kind not in ROW_KINDS:
        raise ConfigError(f"unknown row kind {kind!r}; valid: {', '.join(ROW_KINDS)}")
    rows: list[dict] = []
    for ex in task.examples(split, n, seed=seed, difficulty=difficulty):
        common = {"id": ex.id, "answer": ex.answer, "difficulty": ex.difficulty, "task": task.name}
        if kind == "prompt":
            # The reference solution rides along for rewards that check the reasoning
            # (step_credit); the accuracy reward reads only `answer`.
            rows.append({"prompt": ex.prompt, "solution": ex.solution, **common})
        elif kind == "completion":
            rows.append({"prompt": ex.prompt, "completion": ex.solution, **common})
        elif kind == "messages":
            messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.solution}]
            rows.append({"messages": messages, **common})
        elif kind == "preference":
            rows.append({"prompt": ex.prompt, "chosen": ex.solution, "rejected": ex.wrong_solution, **common})
        elif kind == "scored":
            rows.append({"prompt": ex.prompt, "completion": ex.solution, "score": 1.0, **common})
            rows.append(
                {"prompt": ex.prompt, "completion": ex.wrong_solution, "score": partial_credit(ex), **common}
            )
        elif kind == "ranked":
            completions = [ex.solution, ex.wrong_solution]
            rows.append(
                {
                    "prompt": ex.prompt,
                    "completions": completions,
                    "scores": [1.0, partial_credit(ex)],
                    **common,
                }
            )
        else:
            rows.append(
                {
                    "prompt": ex.prompt,
                    "completions": list(ex.steps),
                    "labels": list(ex.step_labels),
                    "trace": "wrong",
                    **common,
                }
            )
            rows.append(
                {
                    "prompt": ex.prompt,
                    "completions": list(ex.solution_steps),
                    "labels": [True] * len(ex.solution_steps),
                    "trace": "correct",
                    **common,
                }
            )
    return rows
