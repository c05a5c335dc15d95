"""Column-trace slips for PRM data: arithmetic task option slips="near" | "any"."""

from __future__ import annotations

import random

import pytest

from posttrain.data.tasks import get_task
from posttrain.data.tasks.columns import assemble, column_results, render_columns, slip_column
from posttrain.errors import ConfigError

COLUMNS = {"operators": "+-", "trace": "columns"}


def _step_ok(step: str) -> bool:
    """A column step "x+y(+1)=r" / "x-y(-1)=r" checked on its own text."""
    lhs, rhs = step.split("=")
    return eval(lhs) == int(rhs)  # noqa: S307 - the test's own generated digits


def test_any_slip_hand_example():
    # 47+35: columns 12, 8. Slipping the units to 3 drops the carry: the tens become 4+3=7.
    for seed in range(200):
        wrong, k = slip_column(random.Random(seed), 47, "+", 35, "any")
        if (k, wrong[0]) == (0, 3):
            break
    else:
        pytest.fail("no seed slipped the units column to 3")
    assert wrong == [3, 7]
    assert render_columns(47, "+", 35, wrong) == ["7+5=3", "4+3=7", "47+35=73"]


@pytest.mark.parametrize("op", ["+", "-"])
def test_any_slip_changes_one_column_and_later_columns_follow_its_carry(op):
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
        right = column_results(a, op, b)
        wrong, k = slip_column(rng, a, op, b, "any")
        assert wrong[:k] == right[:k] and wrong[k] != right[k]
        assert 0 <= wrong[k] < (20 if op == "+" else 10)
        steps = render_columns(a, op, b, wrong)
        # the slipped column is the only column step whose own arithmetic is wrong
        assert [_step_ok(s) for s in steps[:-1]] == [i != k for i in range(len(wrong))]
        assert assemble(a, op, b, wrong) != assemble(a, op, b, right)


def test_task_option_keeps_the_default_data_and_labels_the_first_slip():
    near = get_task("arithmetic", **COLUMNS).examples("train", 50, seed=1, difficulty=2)
    again = get_task("arithmetic", slips="near", **COLUMNS).examples("train", 50, seed=1, difficulty=2)
    assert [e.steps for e in near] == [e.steps for e in again]
    task = get_task("arithmetic", slips="any", **COLUMNS)
    examples = task.examples("train", 400, seed=1, difficulty=2)
    assert [e.prompt for e in examples[:50]] == [e.prompt for e in near]  # same problems, same split
    firsts = []
    for ex in examples:
        assert task.score(ex.wrong_solution, ex.answer) == 0.0 and task.score(ex.solution, ex.answer) == 1.0
        first = ex.step_labels.index(False)
        assert ex.step_labels == [i < first for i in range(len(ex.steps))]
        assert ex.steps[:first] == ex.solution_steps[:first] and not _step_ok(ex.steps[first])
        firsts.append(first)
    assert {0, 1} <= set(firsts)  # the first wrong step varies


def test_bad_slips_option():
    with pytest.raises(ConfigError, match="slips must be one of near, any"):
        get_task("arithmetic", slips="far")
