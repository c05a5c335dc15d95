"""Countdown: reach a target with the given numbers and + − × ÷ (TinyZero-style RL task).

Each given number may be used at most once; intermediate results must be exact. The
verifier parses the ``<answer>`` expression with a safe parser (no eval), checks the
multiset of literals against the given numbers, and the value against the target.

Difficulty (level: how many numbers, their range):

    1: 2 numbers 1..9     "Use 3 5 to make 15."   <think>3*5=15</think><answer>3*5</answer>
    2: 3 numbers 1..9
    3: 3 numbers 1..25
    4: 4 numbers 1..25
    5: 5 numbers 1..50

The reference solution combines all numbers, one operation per step. The wrong solution
picks a different operator at one step (a wrong choice, computed correctly afterwards), so
its final expression misses the target; steps from that one on are labelled False.

`answer` encodes the problem, "<target> from <n1> <n2> …", since many expressions are right.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from posttrain.data.tasks.base import Problem, Task
from posttrain.data.tasks.expr import ExpressionError, evaluate_expression
from posttrain.data.tasks.program import Program, Ref, apply, evaluate, fmt, render_steps
from posttrain.errors import DataError

LEVELS = {1: (2, 9), 2: (3, 9), 3: (3, 25), 4: (4, 25), 5: (5, 50)}
MAX_TARGET = 999
_ANSWER_FORMAT = re.compile(r"\s*(\d+)\s+from\s+((?:\d+\s*)+)")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def parse_answer(answer: str) -> tuple[int, list[int]]:
    """(target, numbers) from a countdown answer string "24 from 3 4 2"."""
    match = _ANSWER_FORMAT.fullmatch(answer)
    if match is None:
        raise DataError(f"task 'countdown': answer {answer!r} is not '<target> from <numbers>'")
    return int(match.group(1)), [int(x) for x in match.group(2).split()]


def _render(node, program: Program) -> tuple[str, int]:
    """Expression text for a literal or a step, with only the parentheses precedence needs."""
    if not isinstance(node, Ref):
        return str(node), 3
    a, op, b = program[node.index]
    sa, pa = _render(a, program)
    sb, pb = _render(b, program)
    p = _PRECEDENCE[op]
    if pa < p:
        sa = f"({sa})"
    # The right operand of - and / also needs parentheses at equal precedence: a-(b+c).
    if pb < p or (pb == p and op in "-/"):
        sb = f"({sb})"
    return f"{sa}{op}{sb}", p


def _valid_ops(a: Fraction, b: Fraction) -> list[str]:
    """Operators that keep every intermediate a positive integer (and a-b / a/b non-trivial)."""
    ops = ["+", "*"]
    if a > b:
        ops.append("-")
    if b > 1 and a % b == 0:
        ops.append("/")
    return ops


class Countdown(Task):
    """Reach a target from given numbers; the answer is an expression."""

    name = "countdown"
    max_difficulty = 5

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw numbers, combine all of them by random valid operations; the value is the target."""
        count, high = LEVELS[difficulty]
        while True:
            numbers = [rng.randint(1, high) for _ in range(count)]
            program: Program = []
            pool: list = list(numbers)
            values: dict = {}
            while len(pool) > 1:
                i, j = rng.sample(range(len(pool)), 2)
                a, b = pool[i], pool[j]
                va = values[a.index] if isinstance(a, Ref) else Fraction(a)
                vb = values[b.index] if isinstance(b, Ref) else Fraction(b)
                if va < vb:  # larger first, so - and / stay positive integers
                    a, b, va, vb = b, a, vb, va
                op = rng.choice(_valid_ops(va, vb))
                program.append((a, op, b))
                ref = Ref(len(program) - 1)
                values[ref.index] = apply(va, op, vb)
                pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [ref]
            target = values[len(program) - 1]
            if 1 <= target <= MAX_TARGET and target not in numbers:
                break
        wrong_program, k = self._wrong_choice(rng, program, target)
        correct_values = evaluate(program)
        wrong_values = evaluate(wrong_program)
        shown = sorted(numbers) if difficulty >= 3 else numbers
        numbers_text = " ".join(map(str, shown))
        root = Ref(len(program) - 1)
        return Problem(
            key=f"{sorted(numbers)}->{fmt(target)}",
            prompt=f"Use {numbers_text} to make {fmt(target)}.",
            answer=f"{fmt(target)} from {numbers_text}",
            final=_render(root, program)[0],
            steps=render_steps(program, correct_values),
            wrong_steps=render_steps(wrong_program, wrong_values),
            wrong_labels=[i < k for i in range(len(program))],
            wrong_final=_render(root, wrong_program)[0],
        )

    @staticmethod
    def _wrong_choice(rng: random.Random, program: Program, target: Fraction) -> tuple[Program, int]:
        """Swap one step's operator so the final value misses the target."""
        candidates = [(k, op) for k in range(len(program)) for op in "+-*/" if op != program[k][1]]
        rng.shuffle(candidates)
        # Prefer swaps that keep every value a positive integer (plausible), then any.
        for strict in (True, False):
            for k, op in candidates:
                wrong = list(program)
                wrong[k] = (program[k][0], op, program[k][2])
                try:
                    values = evaluate(wrong)
                except ZeroDivisionError:
                    continue
                plausible = all(v.denominator == 1 and v > 0 for v in values)
                if values[-1] != target and (plausible or not strict):
                    return wrong, k
        raise AssertionError("unreachable: a+b, a-b, a*b, a/b cannot all equal one value")

    def check(self, predicted: str, answer: str) -> bool:
        """Safe-parse the expression; literals within the given numbers; value equals the target."""
        target, numbers = parse_answer(answer)
        # Accept "expr" and "expr=target"; the right-hand side, if given, must be the target.
        lhs, _, rhs = predicted.partition("=")
        if rhs.strip() and rhs.strip() != str(target):
            return False
        try:
            value, literals = evaluate_expression(lhs)
        except ExpressionError:
            return False
        return value == target and not (Counter(literals) - Counter(numbers))
