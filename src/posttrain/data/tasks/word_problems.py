"""Templated word problems: a story of one to three changes to a count.

"Ann has 3 apples. Ann finds 4 more. How many apples now?" →
"<think>3+4=7</think><answer>7</answer>". Each sentence after the first applies one
operation; the steps compute them in story order, one per step.

Difficulty (level: operations, allowed operators, number range):

    1: 1 op (+ −),     1..9
    2: 1 op (+ − × ÷), 1..20, ×/÷ by 2..5
    3: 2 ops,          1..20
    4: 3 ops,          1..50

Counts stay non-negative integers (a − only removes what is there, a ÷ divides exactly).
The canonical key leaves out the person's name, so the same story with another name is
in the same split. The wrong solution has one arithmetic slip carried forward.
"""

from __future__ import annotations

import random

from posttrain.data.tasks.base import Problem, Task
from posttrain.data.tasks.program import Program, Ref, evaluate, fmt, render_steps, with_slip

NAMES = ("Ann", "Ben", "Cat", "Dan", "Eve", "Max", "Sam", "Tom", "Zoe", "Lia")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells")
TEMPLATES = {
    "+": ("{name} finds {b} more.", "{name} gets {b} more.", "{name} buys {b} more."),
    "-": ("{name} gives away {b}.", "{name} loses {b}.", "{name} sells {b}."),
    "*": ("{name} now has {b} times as many.",),
    "/": ("{name} splits them into {b} equal piles and keeps one.",),
}
LEVELS = {1: (1, "+-", 9), 2: (1, "+-*/", 20), 3: (2, "+-*/", 20), 4: (3, "+-*/", 50)}
MAX_FACTOR = 5


class WordProblems(Task):
    """Count-tracking stories with + − × ÷; answers are non-negative integers."""

    name = "word_problems"
    max_difficulty = 4

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw a story of LEVELS[difficulty] operations on one count; names are cosmetic."""
        n_ops, operators, high = LEVELS[difficulty]
        item = rng.choice(ITEMS)
        start = rng.randint(1, high)
        count = start
        program: Program = []
        sentences: list[tuple[str, int, int]] = []  # (op, template index, operand)
        for _ in range(n_ops):
            op = rng.choice(operators)
            if (
                op == "-"
                and count == 0
                or op == "/"
                and not any(count % d == 0 for d in range(2, MAX_FACTOR + 1))
            ):
                op = "+"
            if op == "+":
                b = rng.randint(1, high)
            elif op == "-":
                b = rng.randint(1, min(count, high))
            elif op == "*":
                b = rng.randint(2, MAX_FACTOR)
            else:
                b = rng.choice([d for d in range(2, MAX_FACTOR + 1) if count % d == 0])
            program.append((Ref(len(program) - 1) if program else start, op, b))
            count = int(evaluate(program)[-1])
            sentences.append((op, rng.randrange(len(TEMPLATES[op])), b))
        name = rng.choice(NAMES)
        story = [f"{name} has {start} {item}."]
        story += [TEMPLATES[op][t].format(name=name, b=b) for op, t, b in sentences]
        story.append(f"How many {item} now?")
        values = evaluate(program)
        wrong, k = with_slip(rng, program)
        return Problem(
            key=f"{item}|{start}|" + "|".join(f"{op}{t}:{b}" for op, t, b in sentences),
            prompt=" ".join(story),
            answer=fmt(values[-1]),
            final=fmt(values[-1]),
            steps=render_steps(program, values),
            wrong_steps=render_steps(program, wrong),
            wrong_labels=[i < k for i in range(len(program))],
            wrong_final=fmt(wrong[-1]),
        )

    def check(self, predicted: str, answer: str) -> bool:
        """The first word is the number; an optional second word (the noun) is ignored."""
        # A bare number, optionally followed by the item noun ("7" or "7 apples").
        words = predicted.replace(",", "").split()
        return bool(words) and len(words) <= 2 and words[0] == answer.strip()
