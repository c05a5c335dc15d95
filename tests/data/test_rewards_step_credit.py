"""step_credit: partial credit for a reasoning trace that follows the task's reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.rewards import build_reward
from posttrain.data.rewards.text import step_credit_values
from posttrain.data.tasks import get_task, task_rows
from posttrain.errors import RewardError

REF = "<think>7+5=12; 4+3+1=8; 47+35=82</think><answer>82</answer>"


def test_step_credit_worked_example():
    # 47+35 worked by columns has three steps; credit = leading steps equal to them / 3.
    f = build_reward("step_credit")
    completions = [
        REF,  # all three -> 1
        "<think>7+5=12; 4+3=7; 47+35=72</think><answer>72</answer>",  # carry dropped: 1/3
        "<think>7+5=11; 4+3+1=8; 47+35=82</think><answer>82</answer>",  # first column wrong: 0
        "<think>7+5=12;4+3+1=8 ; 47+35=8",  # unclosed, spacing differs: 2 of 3
        "7+5=12; 4+3+1=8",  # no think block: the whole text is the trace
        "<think>7+5=12; 4+3+1=8; 47+35=82; 82=82</think><answer>82</answer>",  # extra step: 1
    ]
    got = f(["47+35="] * 6, completions, solution=[REF] * 6)
    assert got == pytest.approx([1.0, 1 / 3, 0.0, 2 / 3, 2 / 3, 1.0])


def test_step_credit_template_opened_think_and_missing_reference():
    f = build_reward("step_credit")
    # The chat template opened <think> at the end of the prompt: the completion starts inside it.
    got = f(
        ["<|user|>47+35=<think>", "p", "p"], ["7+5=12; 4+3+1=9</think>", "x", "y"], solution=[REF, None, ""]
    )
    assert got == [pytest.approx(1 / 3), None, None]
    with pytest.raises(RewardError, match="solution"):
        f(["p"], ["c"], answer=["1"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["1+1=2", "2+2=4", "3+3=6", "x"]), min_size=1, max_size=6), st.integers(0, 6))
def test_step_credit_counts_the_leading_agreement(reference, cut):
    # Property: a trace equal to the reference's first `cut` steps, then a deviation, scores
    # exactly cut / len(reference) (capped at 1), and the score never exceeds 1.
    cut = min(cut, len(reference))
    steps = reference[:cut] + (["not a step"] if cut < len(reference) else [])
    assert step_credit_values(steps, reference) == pytest.approx(cut / len(reference))
    assert step_credit_values(reference + ["more"], reference) == 1.0


def test_task_prompt_rows_carry_the_reference_solution():
    task = get_task("arithmetic", operators="+-", trace="columns")
    rows = task_rows(task, "train", 4, kind="prompt", difficulty=2)
    f = build_reward("step_credit")
    # Each row's own reference scores 1; another row's reference scores less.
    own = f(
        [r["prompt"] for r in rows], [r["solution"] for r in rows], solution=[r["solution"] for r in rows]
    )
    assert own == [1.0] * 4
    shifted = f(
        [r["prompt"] for r in rows],
        [r["solution"] for r in rows[1:] + rows[:1]],
        solution=[r["solution"] for r in rows],
    )
    assert all(s < 1.0 for s in shifted)
