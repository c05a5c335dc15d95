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
"""

from __future__ import annotations

import random
import re

from posttrain.data.tasks.base import Problem, Task
from posttrain.data.tasks.program import Program, Ref, evaluate, fmt, render_steps, with_slip
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
    """

    name = "arithmetic"
    max_difficulty = 5

    def __init__(self, *, prompt_style: str = "question", **options):
        super().__init__(**options)
        if prompt_style not in ("question", "bare"):
            raise ConfigError(
                f"task 'arithmetic': prompt_style must be 'question' or 'bare', got {prompt_style!r}"
            )
        self.prompt_style = prompt_style

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw an expression with LEVELS[difficulty] operations and operand sizes."""
        n_ops, operators, digits, factor_digits = LEVELS[difficulty]
        ops = [rng.choice(operators) for _ in range(n_ops)]
        numbers = [_number(rng, digits)]
        for op in ops:
            numbers.append(_number(rng, factor_digits if op == "*" else digits))
        if difficulty == 1 and ops[0] == "-" and numbers[1] > numbers[0]:
            numbers.reverse()
        expression = "".join(f"{num}{op}" for num, op in zip(numbers, ops)) + str(numbers[-1])
        program = precedence_program(numbers, ops)
        values = evaluate(program)
        wrong, k = with_slip(rng, program)
        prompt = f"What is {expression}?" if self.prompt_style == "question" else f"{expression}="
        return Problem(
            key=expression,
            prompt=prompt,
            answer=fmt(values[-1]),
            final=fmt(values[-1]),
            steps=render_steps(program, values),
            wrong_steps=render_steps(program, wrong),
            wrong_labels=[i < k for i in range(len(program))],
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
