"""Multi-digit integer arithmetic with + − × under the usual precedence.

Difficulty sets the number of operations and operand sizes (level: ops, digits of the
+/− operands, digits of the × factor that is multiplied in):

    1: 1 op (+ −),    1 digit        "What is 7+5?"      <think>7+5=12</think><answer>12</answer>
    2: 1 op (+ − *),  2 digits, ×1 digit
    3: 2 ops,         2 digits, ×1 digit
    4: 3 ops,         3 digits, ×2 digits
    5: 4 ops,         3 digits, ×2 digits

Level 1 subtractions never go negative; from level 3 on, intermediate and final results
may. Steps evaluate all products left to right first, then sums and differences left to
right, one operation per step ("5*3=15; 7+15=22"). The wrong solution has one arithmetic
slip (off by 1, 2 or 10) carried through the later steps.

Options (defaults reproduce the examples above exactly):
    operators="+-"   draw only these operators (each level keeps its own that remain), e.g.
                     difficulty 2 with "+-" = two-digit addition and subtraction.
    trace="columns"  work every multi-digit + and − column by column with carries and
                     borrows (data/tasks/columns.py): "47+35" -> "7+5=12; 4+3+1=8; 47+35=82".
                     Held-out problems then reuse the single-digit facts and the carry rule
                     of training problems instead of being unseen two-digit facts. A
                     one-operation subtraction is drawn non-negative, as at level 1; the
                     slip of the wrong solution is then one column off by one.
    slips="any"      column traces only: the slipped column gets any other possible result
                     (not just ±1) and later columns follow the carry it implies
                     (columns.slip_column). Slips a step-local judge can see without
                     knowing every single-digit fact exactly: PRM training and evaluation
                     data (docs/benchmarks.md, PRM). The default "near" keeps today's data.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from posttrain.data.tasks.base import Problem, Task
from posttrain.data.tasks.columns import (
    SLIPS,
    assemble,
    column_results,
    columns_apply,
    render_columns,
    slip_column,
)
from posttrain.data.tasks.program import Program, Ref, evaluate, fmt, render_steps, slip_value, with_slip
from posttrain.errors import ConfigError, DataError

_INTEGER_RE = re.compile(r"([+-]?\d+)(?:\.0*)?")

# level -> (number of operations, allowed operators, digits of +/- operands, digits of a factor)
LEVELS = {
    1: (1, "+-", 1, 1),
    2: (1, "+-*", 2, 1),
    3: (2, "+-*", 2, 1),
    4: (3, "+-*", 3, 2),
    5: (4, "+-*", 3, 2),
}


def _number(rng: random.Random, digits: int) -> int:
    # Multi-digit levels draw numbers with exactly `digits` digits so size tracks level.
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def precedence_program(numbers: list[int], ops: list[str]) -> Program:
    """Steps computing ``n0 o1 n1 o2 n2 …`` with × before + −, each left to right."""
    program: Program = []
    terms: list = [numbers[0]]  # operands of the +/- pass: literals or Refs to products
    additive: list[str] = []
    for op, num in zip(ops, numbers[1:]):
        if op == "*":
            program.append((terms[-1], "*", num))
            terms[-1] = Ref(len(program) - 1)
        else:
            additive.append(op)
            terms.append(num)
    acc = terms[0]
    for op, term in zip(additive, terms[1:]):
        program.append((acc, op, term))
        acc = Ref(len(program) - 1)
    return program


class Arithmetic(Task):
    """Integer expressions such as "What is 7+5*3?"; answers are integers.

    prompt_style: "question" ("What is 7+5?") or "bare" ("7+5=").
    operators: "" (each level's own operators) or a subset of "+-*" to draw from.
    trace: "ops" (one step per operation) or "columns" (see the module docstring).
    slips: "near" or "any": how a column of a column trace slips (see the module docstring).
    """

    name = "arithmetic"
    max_difficulty = 5

    def __init__(
        self,
        *,
        prompt_style: str = "question",
        operators: str = "",
        trace: str = "ops",
        slips: str = "near",
        **options,
    ):
        super().__init__(**options)
        if prompt_style not in ("question", "bare"):
            raise ConfigError(
                f"task 'arithmetic': prompt_style must be 'question' or 'bare', got {prompt_style!r}"
            )
        if not isinstance(operators, str) or any(c not in "+-*" for c in operators):
            raise ConfigError(f"task 'arithmetic': operators must be a subset of '+-*', got {operators!r}")
        if trace not in ("ops", "columns"):
            raise ConfigError(f"task 'arithmetic': trace must be 'ops' or 'columns', got {trace!r}")
        if slips not in SLIPS:
            raise ConfigError(f"task 'arithmetic': slips must be one of {', '.join(SLIPS)}, got {slips!r}")
        self.slips = slips
        self.prompt_style = prompt_style
        self.operators = operators
        self.trace = trace

    def _level_operators(self, difficulty: int) -> str:
        level_ops = LEVELS[difficulty][1]
        if not self.operators:
            return level_ops
        kept = "".join(op for op in level_ops if op in self.operators)
        if not kept:
            raise ConfigError(
                f"task 'arithmetic': operators {self.operators!r} leave none of difficulty {difficulty}'s "
                f"operators {level_ops!r}"
            )
        return kept

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw an expression with LEVELS[difficulty] operations and operand sizes."""
        n_ops, _, digits, factor_digits = LEVELS[difficulty]
        operators = self._level_operators(difficulty)
        ops = [rng.choice(operators) for _ in range(n_ops)]
        numbers = [_number(rng, digits)]
        for op in ops:
            numbers.append(_number(rng, factor_digits if op == "*" else digits))
        non_negative = difficulty == 1 or (self.trace == "columns" and n_ops == 1)
        if non_negative and ops[0] == "-" and numbers[1] > numbers[0]:
            numbers.reverse()
        expression = "".join(f"{num}{op}" for num, op in zip(numbers, ops)) + str(numbers[-1])
        program = precedence_program(numbers, ops)
        values = evaluate(program)
        prompt = f"What is {expression}?" if self.prompt_style == "question" else f"{expression}="
        if self.trace == "columns":
            steps = _column_steps(program, values)
            wrong, wrong_steps, first_wrong = _column_slip(rng, program, values)
            if self.slips == "any":
                # The near slip above is still drawn from the shared generator, so the problem
                # sequence (the prompts of every split) stays that of the default data; the
                # any-slip comes from a generator seeded by the problem itself.
                slip_rng = random.Random(f"slip:{expression}")
                wrong, wrong_steps, first_wrong = _column_slip(slip_rng, program, values, "any")
            wrong_labels = [i < first_wrong for i in range(len(wrong_steps))]
        else:
            wrong, k = with_slip(rng, program)
            steps, wrong_steps = render_steps(program, values), render_steps(program, wrong)
            wrong_labels = [i < k for i in range(len(program))]
        return Problem(
            key=expression,
            prompt=prompt,
            answer=fmt(values[-1]),
            final=fmt(values[-1]),
            steps=steps,
            wrong_steps=wrong_steps,
            wrong_labels=wrong_labels,
            wrong_final=fmt(wrong[-1]),
        )

    def check(self, predicted: str, answer: str) -> bool:
        """Integer equality; "12", "+12", "12.0" and "1,200"-style thousands separators accepted."""
        try:
            target = int(answer.strip())
        except ValueError:
            raise DataError(f"task 'arithmetic': answer {answer!r} is not an integer") from None
        text = predicted.replace(",", "").replace(" ", "")
        # Accept "12", "+12" and "12.0"; nothing looser (no "≈12", no "12 apples").
        match = _INTEGER_RE.fullmatch(text)
        return match is not None and int(match.group(1)) == target


def _operands(program: Program, values: list[Fraction], i: int) -> tuple[int, str, int]:
    a, op, b = program[i]
    va = values[a.index] if isinstance(a, Ref) else a
    vb = values[b.index] if isinstance(b, Ref) else b
    return int(va), op, int(vb)


def _column_steps(program: Program, values: list[Fraction], slipped: dict | None = None) -> list[str]:
    """Steps of `program` at `values`, each eligible + / − worked column by column.

    slipped: {step index: column results} to render instead of the correct columns.
    """
    steps: list[str] = []
    for i in range(len(program)):
        a, op, b = _operands(program, values, i)
        if columns_apply(a, op, b):
            results = (slipped or {}).get(i) or column_results(a, op, b)
            steps.extend(render_columns(a, op, b, results))
        else:
            steps.extend(render_steps([(a, op, b)], [values[i]]))
    return steps


def _column_slip(
    rng: random.Random, program: Program, values: list[Fraction], mode: str = "near"
) -> tuple[list[Fraction], list[str], int]:
    """(wrong values, wrong column trace, index of its first wrong step) for one slip.

    A column-worked step slips one column (`mode`, see columns.slip_column); any other step
    slips as in the default trace. Slips that a later product by zero would cancel
    are rejected, as in `program.with_slip`; the last operation's slip always shows.
    """
    order = list(range(len(program)))
    rng.shuffle(order)
    order.remove(len(program) - 1)
    order.append(len(program) - 1)
    for i in order:
        a, op, b = _operands(program, values, i)
        slipped: dict[int, list[int]] = {}
        if columns_apply(a, op, b):
            results, column = slip_column(rng, a, op, b, mode)
            slipped[i] = results
            wrong_value = Fraction(int(values[i]) + _column_shift(a, op, b, results))
        else:
            column = 0
            wrong_value = slip_value(rng, values[i])
        wrong = evaluate(program, {i: wrong_value})
        if wrong[-1] != values[-1]:
            before = len(_column_steps(program[:i], values[:i]))
            return wrong, _column_steps(program, wrong, slipped), before + column
    raise AssertionError("unreachable: a slip in the last operation always changes the result")


def _column_shift(a: int, op: str, b: int, results: list[int]) -> int:
    correct = column_results(a, op, b)
    return assemble(a, op, b, results) - assemble(a, op, b, correct)
