"""Step-by-step arithmetic traces shared by the arithmetic, countdown and word-problem tasks.

A *program* is a list of binary operations; each operand is a literal integer or a `Ref`
to an earlier step's result. Evaluating it gives one value per step, and each step renders
as ``"a op b=c"`` — the reasoning steps inside ``<think>``.

Wrong traces come from one plausible slip (`with_slip`): an arithmetic error in one step,
carried correctly through the later steps, so the trace is right up to the slip and wrong
from it on — exactly what the PRM step labels say.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

OPS = "+-*/"


@dataclass(frozen=True)
class Ref:
    """The result of step `index` used as an operand."""

    index: int


Operand = int | Ref
Program = list[tuple[Operand, str, Operand]]


def apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    """a op b on exact rationals; raises ZeroDivisionError for a division by zero."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    raise ValueError(f"unknown operator {op!r}")


def evaluate(program: Program, overrides: dict[int, Fraction] | None = None) -> list[Fraction]:
    """Per-step values of `program`; `overrides[i]` replaces step i's result (a slip)."""
    values: list[Fraction] = []
    for i, (a, op, b) in enumerate(program):
        va = values[a.index] if isinstance(a, Ref) else Fraction(a)
        vb = values[b.index] if isinstance(b, Ref) else Fraction(b)
        value = apply(va, op, vb)
        if overrides and i in overrides:
            value = overrides[i]
        values.append(value)
    return values


def fmt(value: Fraction) -> str:
    """An integer as "12"/"-3"; a non-integer rational as "7/2"."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def render_steps(program: Program, values: list[Fraction]) -> list[str]:
    """One ``"a op b=c"`` string per step, operands taken from literals or earlier values."""
    steps = []
    for (a, op, b), value in zip(program, values):
        sa = fmt(values[a.index]) if isinstance(a, Ref) else str(a)
        sb = fmt(values[b.index]) if isinstance(b, Ref) else str(b)
        steps.append(f"{sa}{op}{sb}={fmt(value)}")
    return steps


def slip_value(rng: random.Random, value: Fraction) -> Fraction:
    """A plausible wrong result near `value`: off by 1 or 2, or a carry error of 10."""
    delta = rng.choice([1, 1, 2, 10])
    sign = rng.choice([-1, 1])
    # Keep a non-negative result non-negative: a slip that flips the sign is implausible.
    if value >= 0 and value + sign * delta < 0:
        sign = 1
    return value + sign * delta


def with_slip(rng: random.Random, program: Program) -> tuple[list[Fraction], int]:
    """Values of `program` with one arithmetic slip, and the index of the slipped step.

    The slip is carried forward correctly. Candidates whose final value equals the correct
    one (a slip multiplied by zero) or that make a later division inexact are rejected; a
    slip in the last step always changes the final value, so one always exists.
    """
    correct = evaluate(program)
    order = list(range(len(program)))
    rng.shuffle(order)
    for k in order:
        for _ in range(4):
            wrong = slip_value(rng, correct[k])
            try:
                values = evaluate(program, {k: wrong})
            except ZeroDivisionError:
                continue
            if values[-1] != correct[-1] and all(v.denominator == 1 for v in values):
                return values, k
    k = len(program) - 1
    return evaluate(program, {k: correct[k] + 1}), k
