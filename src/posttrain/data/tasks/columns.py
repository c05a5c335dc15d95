"""Column-by-column ("schoolbook") traces for multi-digit addition and subtraction.

The default arithmetic trace writes one step per operation ("47+35=82"), so a small model
has to memorise every two-digit sum as a fact and nothing learnt on one problem helps on
another. A column trace reduces every sum to ~100 single-digit facts plus a carry rule,
which every problem of every split shares, so what RL reinforces on training problems
transfers to held-out ones (the point of the `trace="columns"` option of the arithmetic
task):

    47+35:  "7+5=12; 4+3+1=8; 47+35=82"     (units, tens with the carry, the assembled result)
    53-27:  "13-7=6; 5-2-1=2; 53-27=26"     (a borrow shows as a 1 before the top digit,
                                             and as "-1" in the next column)

Columns run from the units up; a missing digit of the shorter operand is written as 0.
The last step restates the whole operation with its result, in the ``a op b=c`` form of
the default trace, so the answer is read off the trace's last step as before.
"""

from __future__ import annotations

import random


def _digits(n: int, width: int) -> list[int]:
    """Digits of non-negative `n`, units first, padded with zeros to `width`."""
    return [(n // 10**i) % 10 for i in range(width)]


def column_results(a: int, op: str, b: int) -> list[int]:
    """Per-column results, units first: the column sum (0..19) for +, the digit for −.

    a, b: non-negative integers; for "-" also a >= b (the caller renders other cases as a
    single step). The returned values are what each column step writes after "=".
    """
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    out, carry = [], 0
    for x, y in zip(da, db):
        if op == "+":
            s = x + y + carry
            out.append(s)
            carry = s // 10
        else:
            r = x - y - carry
            carry = 1 if r < 0 else 0
            out.append(r + 10 * carry)
    return out


def assemble(a: int, op: str, b: int, results: list[int]) -> int:
    """The number the column results spell: last digits from the top column down, plus the
    final carry of an addition (so a slipped column changes the result by ±10^column)."""
    digits = [r % 10 for r in results]
    value = sum(d * 10**i for i, d in enumerate(digits))
    if op == "+" and results and results[-1] >= 10:
        value += 10 ** len(results)
    return value


def render_columns(a: int, op: str, b: int, results: list[int]) -> list[str]:
    """The column steps for `results` (see the module docstring), then ``a op b=value``.

    The carries each step shows are derived from the *given* results (borrows from the
    digits), so a slipped column that keeps its carry (see `slip_column`) yields a trace
    that is consistent apart from that one column.
    """
    width = len(results)
    da, db = _digits(a, width), _digits(b, width)
    steps, carry = [], 0
    for x, y, r in zip(da, db, results):
        if op == "+":
            steps.append(f"{x}+{y}{'+1' if carry else ''}={r}")
            carry = 1 if r >= 10 else 0
        else:
            borrow = 1 if x - y - carry < 0 else 0
            top = f"1{x}" if borrow else str(x)
            steps.append(f"{top}-{y}{'-1' if carry else ''}={r}")
            carry = borrow
    steps.append(f"{a}{op}{b}={assemble(a, op, b, results)}")
    return steps


def columns_apply(a: int, op: str, b: int) -> bool:
    """Whether a op b gets a column trace: + or − of non-negative operands, at least one
    with two or more digits (a one-digit sum is a single fact already), and no negative
    difference (schoolbook subtraction needs the larger number on top)."""
    if op not in "+-" or a < 0 or b < 0 or max(a, b) < 10:
        return False
    return op == "+" or a >= b


SLIPS = ("near", "any")


def slip_column(rng: random.Random, a: int, op: str, b: int, mode: str = "near") -> tuple[list[int], int]:
    """Column results with one column slipped, and that column's index.

    mode "near": the column is off by one and stays a possible column result (0..19 for a
    sum, 0..9 for a difference digit) with the same carry, so the assembled result moves by
    exactly ±10^k and stays >= 0.
    mode "any": the column gets any other possible result, and for + every later column
    follows the carry the slipped value implies (writing 7+5=3 carries nothing), the way a
    writer who trusts their own slip goes on. Borrows depend on the digits only, so a
    subtraction's later columns are unchanged.
    """
    results = column_results(a, op, b)
    k = rng.randrange(len(results))
    wrong = list(results)
    if mode == "any":
        top = 20 if op == "+" else 10
        wrong[k] = rng.choice([v for v in range(top) if v != results[k]])
        if op == "+":
            width = len(results)
            da, db = _digits(a, width), _digits(b, width)
            carry = 1 if wrong[k] >= 10 else 0
            for j in range(k + 1, width):
                wrong[j] = da[j] + db[j] + carry
                carry = 1 if wrong[j] >= 10 else 0
        return wrong, k
    # Stay within the column's decade (a sum of 9 never slips to 10, nor 10 to 9): the carry
    # into the next column, and so every later column, stays right, and the slip moves the
    # result by exactly ±10^k.
    decade = results[k] // 10
    options = [v for v in (results[k] - 1, results[k] + 1) if v // 10 == decade and v >= 0]
    wrong[k] = rng.choice(options)
    return wrong, k
