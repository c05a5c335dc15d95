"""Synthetic tasks: determinism, disjoint splits, verifiers, difficulty, step labels, rows."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.datasets import validate_rows
from posttrain.data.tasks import (
    ROW_KINDS,
    STEP_SEPARATOR,
    TASKS,
    extract_answer,
    get_task,
    split_of,
    task_rows,
)
from posttrain.data.tasks.countdown import parse_answer
from posttrain.data.tasks.expr import ExpressionError, evaluate_expression
from posttrain.errors import ConfigError, DataError

NAMES = ["arithmetic", "countdown", "sorting", "word_problems", "tool_arithmetic"]
# Tasks whose solutions are <think>steps</think><answer>..</answer> (tool_arithmetic's are
# tool-call transcripts, tested in tests/engines/test_multiturn.py).
THINK_TASKS = [n for n in NAMES if n != "tool_arithmetic"]
_THINK = re.compile(r"<think>(.*)</think><answer>(.*)</answer>", re.DOTALL)


def levels(name):
    return range(1, get_task(name).max_difficulty + 1)


def test_registry_names_and_errors():
    assert TASKS.names() == sorted(NAMES)
    with pytest.raises(ConfigError, match="Did you mean 'countdown'"):
        get_task("countdwn")
    with pytest.raises(ConfigError, match="has no option 'digits'.*prompt_style"):
        get_task("arithmetic", digits=3)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_from_seed(name):
    task = get_task(name)
    a = task.examples("train", 30, seed=3)
    b = get_task(name).examples("train", 30, seed=3)
    c = task.examples("train", 30, seed=4)
    assert [e.to_row() for e in a] == [e.to_row() for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert len({e.id for e in a}) == 30


@pytest.mark.parametrize("name", NAMES)
def test_train_test_disjoint_across_seeds_and_levels(name):
    task = get_task(name)
    train = {e.prompt for s in (0, 1) for e in task.examples("train", 150, seed=s)}
    test = {e.prompt for s in (0, 7) for e in task.examples("test", 150, seed=s)}
    assert train and test
    assert not train & test


@pytest.mark.parametrize("name", NAMES)
def test_split_follows_key_hash(name):
    import random

    task = get_task(name)
    train = {e.prompt for e in task.examples("train", 300, seed=0)}
    test = {e.prompt for e in task.examples("test", 100, seed=0)}
    rng = random.Random(123)
    seen = {"train": 0, "test": 0}
    for _ in range(300):
        p = task.generate(rng, rng.randint(1, task.max_difficulty))
        split = split_of(name, p.key, task.test_fraction)
        seen[split] += 1
        # A problem whose key hashes to one split never shows up in the other.
        assert p.prompt not in (test if split == "train" else train)
    assert seen["train"] > seen["test"] > 0
    fractions = [split_of(name, str(i), 0.2) == "test" for i in range(4000)]
    assert 0.17 < sum(fractions) / 4000 < 0.23


@pytest.mark.parametrize("name", NAMES)
def test_reference_scores_one_and_wrong_scores_zero(name):
    task = get_task(name)
    for level in levels(name):
        for split in ("train", "test"):
            for ex in task.examples(split, 40, seed=1, difficulty=level):
                assert task.score(ex.solution, ex.answer) == 1.0, ex
                assert task.score(ex.wrong_solution, ex.answer) == 0.0, ex
                assert ex.difficulty == level


@pytest.mark.parametrize("name", THINK_TASKS)
def test_step_labels_consistent(name):
    task = get_task(name)
    for ex in task.examples("train", 60, seed=2):
        think, final = _THINK.fullmatch(ex.solution).groups()
        assert think.split(STEP_SEPARATOR) == ex.solution_steps
        wrong_think, _ = _THINK.fullmatch(ex.wrong_solution).groups()
        assert wrong_think.split(STEP_SEPARATOR) == ex.steps
        assert len(ex.step_labels) == len(ex.steps) >= 1
        # Labels are True up to the first wrong step, False from it on, and some step is wrong.
        first_wrong = ex.step_labels.index(False)
        assert all(ex.step_labels[:first_wrong]) and not any(ex.step_labels[first_wrong:])
        # Steps before the first wrong one are exactly the reference trace's steps.
        assert ex.steps[:first_wrong] == ex.solution_steps[:first_wrong]
        assert ex.steps[first_wrong] != ex.solution_steps[first_wrong]
        assert all(STEP_SEPARATOR not in s for s in ex.solution_steps + ex.steps)


def _size(name, ex):
    """(primary, secondary) problem size: what the task's difficulty levels grow."""
    numbers = [int(x) for x in re.findall(r"\d+", ex.prompt)]
    if name == "arithmetic":
        return len(numbers), len(ex.prompt)
    if name == "countdown":
        return len(parse_answer(ex.answer)[1]), max(numbers)
    if name == "sorting":
        return len(ex.answer.split()), 0
    return len(ex.solution_steps), max(numbers)


@pytest.mark.parametrize("name", NAMES)
def test_difficulty_changes_problem_size(name):
    task = get_task(name)
    sizes = []
    for level in levels(name):
        exs = task.examples("train", 40, seed=0, difficulty=level)
        sizes.append(tuple(sum(_size(name, e)[j] for e in exs) / len(exs) for j in range(2)))
    # Strictly increasing in (primary, secondary) order: every level is bigger than the last.
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes


def test_level_one_is_short():
    # A char-level model learns these in minutes only if the texts are short.
    for name in THINK_TASKS:
        for ex in get_task(name).examples("train", 20, seed=0, difficulty=1):
            assert len(ex.prompt) <= 60, ex.prompt
            assert len(ex.solution) <= 50, ex.solution
    ex = get_task("arithmetic").examples("train", 1, seed=0, difficulty=1)[0]
    assert re.fullmatch(r"What is \d[+-]\d\?", ex.prompt)
    bare = get_task("arithmetic", prompt_style="bare").examples("train", 1, seed=0, difficulty=1)[0]
    assert re.fullmatch(r"\d[+-]\d=", bare.prompt)


def test_mixed_difficulty_and_exhausted_space_repeats():
    task = get_task("arithmetic")
    mixed = task.examples("train", 200, seed=0)
    assert {e.difficulty for e in mixed} == set(levels("arithmetic"))
    # Level 1 has only ~155 problems; asking for more repeats distinct ones with unique ids.
    many = task.examples("train", 300, seed=0, difficulty=1)
    assert len({e.id for e in many}) == 300
    distinct = {e.prompt for e in many}
    assert 100 < len(distinct) < 300


def test_examples_argument_errors():
    task = get_task("sorting")
    with pytest.raises(ConfigError, match="split"):
        task.examples("valid", 3)
    with pytest.raises(ConfigError, match="difficulty must be 1..5"):
        task.examples("train", 3, difficulty=9)
    with pytest.raises(ConfigError, match="n must be"):
        task.examples("train", -1)


def test_hand_arithmetic_examples():
    a = get_task("arithmetic")
    for text, answer, score in [
        ("<think>7+5=12</think><answer>12</answer>", "12", 1.0),
        ("<answer> 12.0 </answer>", "12", 1.0),
        ("<answer>-3</answer>", "-3", 1.0),
        ("<answer>13</answer>", "12", 0.0),
        ("12", "12", 0.0),  # no answer tag
        ("<answer>12 apples</answer>", "12", 0.0),
        ("<answer>1</answer> then <answer>12</answer>", "12", 1.0),  # last answer counts
    ]:
        assert a.score(text, answer) == score, text
    with pytest.raises(DataError, match="not an integer"):
        a.score("<answer>1</answer>", "one")
    from posttrain.data.tasks.arithmetic import precedence_program
    from posttrain.data.tasks.program import evaluate, render_steps

    program = precedence_program([7, 5, 3, 2], ["+", "*", "-"])
    assert render_steps(program, evaluate(program)) == ["5*3=15", "7+15=22", "22-2=20"]


def test_countdown_verifier():
    c = get_task("countdown")
    assert c.score("<answer>(3+5)*2</answer>", "16 from 3 5 2") == 1.0
    assert c.score("<answer>2*(5+3)=16</answer>", "16 from 3 5 2") == 1.0
    assert c.score("<answer>3 × 5 + 1</answer>", "16 from 3 5 1") == 1.0
    assert c.score("<answer>(3+5)*2=17</answer>", "16 from 3 5 2") == 0.0
    assert c.score("<answer>(3+5)*2*1</answer>", "16 from 3 5 2") == 0.0  # 1 not given
    assert c.score("<answer>(5+5+5+1)</answer>", "16 from 5 5 1") == 0.0  # 5 used 3 times
    assert c.score("<answer>8*2</answer>", "16 from 3 5 2") == 0.0  # 8 not given
    assert c.score("<answer>__import__('os')</answer>", "16 from 3 5 2") == 0.0
    assert c.score("<answer>-3+19</answer>", "16 from 3 19") == 0.0  # no unary minus
    assert c.score("<answer>3/(5-5)</answer>", "16 from 3 5 5") == 0.0
    assert c.score("<answer>9/3*2</answer>", "6 from 9 3 2") == 1.0
    with pytest.raises(DataError, match="target"):
        c.score("<answer>1</answer>", "sixteen")


def test_expression_parser_bounds():
    assert evaluate_expression("2*(3+4)-5/5") == (13, [2, 3, 4, 5, 5])
    for bad in (
        "",
        "2+",
        "(2",
        "2)",
        "2**3",
        "a+1",
        "2 3",
        "1/0",
        "(" * 40 + "1" + ")" * 40,
        "1+" * 150 + "1",
    ):
        with pytest.raises(ExpressionError):
            evaluate_expression(bad)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 99), min_size=1, max_size=6),
    st.lists(st.sampled_from("+-*"), min_size=5, max_size=5),
)
def test_expression_parser_agrees_with_python_precedence(numbers, ops):
    # Property: for + - * over literals, the safe parser agrees with Python's precedence.
    text = "".join(f"{n}{op}" for n, op in zip(numbers, ops)) + "7"
    # Compute the reference by hand (no eval): products first, then left-to-right sums.
    tokens = [*numbers[: len(ops)], 7]
    used_ops = ops[: len(tokens) - 1]
    terms, signs = [tokens[0]], []
    for op, n in zip(used_ops, tokens[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            signs.append(op)
            terms.append(n)
    expected = terms[0]
    for op, t in zip(signs, terms[1:]):
        expected = expected + t if op == "+" else expected - t
    value, literals = evaluate_expression(text)
    assert value == expected
    assert literals == tokens


def test_sorting_and_word_problem_verifiers():
    s = get_task("sorting")
    assert s.score("<answer>1, 2, 3</answer>", "1 2 3") == 1.0
    assert s.score("<answer>1 3 2</answer>", "1 2 3") == 0.0
    assert s.score("<answer>1 2</answer>", "1 2 3") == 0.0
    w = get_task("word_problems")
    assert w.score("<answer>7</answer>", "7") == 1.0
    assert w.score("<answer>7 apples</answer>", "7") == 1.0
    assert w.score("<answer>17</answer>", "7") == 0.0
    assert extract_answer("<think>x</think>") is None


def test_sorting_options():
    only_digits = get_task("sorting", items="digits", operations=["sort"])
    for ex in only_digits.examples("train", 20, seed=0):
        assert ex.prompt.startswith("Sort: ")
        assert ex.answer.replace(" ", "").isdigit()
        assert ex.answer.split() == sorted(ex.prompt[len("Sort: ") :].split())
    with pytest.raises(ConfigError, match="operations"):
        get_task("sorting", operations=["shuffle"])


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_task_rows_are_valid_dataset_rows(kind):
    rows = task_rows("arithmetic", "train", 10, seed=0, kind=kind, difficulty=2)
    assert len(rows) == (20 if kind in ("stepwise", "scored") else 10)
    validate_rows(rows, kind, source="task_rows")
    for row in rows:
        assert {"id", "answer", "difficulty", "task"} <= set(row)
    if kind == "stepwise":
        traces = [r["trace"] for r in rows]
        assert traces == ["wrong", "correct"] * 10
        assert all(all(r["labels"]) for r in rows[1::2])
        assert all(not all(r["labels"]) for r in rows[0::2])
    with pytest.raises(ConfigError, match="row kind"):
        task_rows("arithmetic", "train", 1, kind="pairs")


def test_generated_problem_counts_are_sane():
    c = get_task("countdown")
    for ex in c.examples("train", 50, seed=5, difficulty=4):
        target, numbers = parse_answer(ex.answer)
        assert len(numbers) == 4 and 1 <= target <= 999 and target not in numbers


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(NAMES), st.integers(0, 10**6), st.integers(1, 5), st.sampled_from(["train", "test"]))
def test_any_seed_gives_verified_consistent_examples(name, seed, level, split):
    # Property over seeds and levels: reference right, wrong trace wrong, labels monotone.
    task = get_task(name)
    level = min(level, task.max_difficulty)
    for ex in task.examples(split, 5, seed=seed, difficulty=level):
        assert task.score(ex.solution, ex.answer) == 1.0
        assert task.score(ex.wrong_solution, ex.answer) == 0.0
        labels = ex.step_labels
        assert False in labels and labels == sorted(labels, reverse=True)
        assert len(ex.solution_steps) == len(ex.steps)


# ----------------------------------------------------------------- arithmetic column traces


def test_column_trace_hand_examples():
    from posttrain.data.tasks.columns import assemble, column_results, render_columns

    # 47+35: units 7+5=12 (write 2, carry 1); tens 4+3+1=8 -> 82.
    assert column_results(47, "+", 35) == [12, 8]
    assert render_columns(47, "+", 35, [12, 8]) == ["7+5=12", "4+3+1=8", "47+35=82"]
    # 99+99: both columns carry; the final carry becomes the hundreds digit.
    assert render_columns(99, "+", 99, column_results(99, "+", 99)) == ["9+9=18", "9+9+1=19", "99+99=198"]
    # 53-27: 3<7 borrows (13-7=6); tens 5-2-1=2 -> 26.
    assert render_columns(53, "-", 27, column_results(53, "-", 27)) == ["13-7=6", "5-2-1=2", "53-27=26"]
    # 105-99: a borrow chain through a zero, leading zeros dropped from the result.
    assert render_columns(105, "-", 99, column_results(105, "-", 99)) == [
        "15-9=6",
        "10-9-1=0",
        "1-0-1=0",
        "105-99=6",
    ]
    # A slipped units column (12 -> 11) still carries, so the result moves by exactly 1.
    assert assemble(47, "+", 35, [11, 8]) == 81
    assert render_columns(47, "+", 35, [11, 8]) == ["7+5=11", "4+3+1=8", "47+35=81"]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 9999), st.integers(0, 9999), st.sampled_from("+-"), st.integers(0, 10**6))
def test_column_trace_properties(a, b, op, seed):
    import random

    from posttrain.data.tasks.columns import assemble, column_results, columns_apply, slip_column

    if op == "-" and b > a:
        a, b = b, a
    exact = a + b if op == "+" else a - b
    results = column_results(a, op, b)
    assert len(results) == max(len(str(a)), len(str(b)))
    assert assemble(a, op, b, results) == exact
    if columns_apply(a, op, b):
        wrong, k = slip_column(random.Random(seed), a, op, b)
        # Exactly one column differs by one, and the result moves by exactly 10^k.
        assert [i for i in range(len(results)) if wrong[i] != results[i]] == [k]
        assert abs(wrong[k] - results[k]) == 1
        assert abs(assemble(a, op, b, wrong) - exact) == 10**k


def _columns(**options):
    return get_task("arithmetic", operators="+-", trace="columns", **options)


def test_column_trace_examples_are_consistent_at_every_level():
    task = _columns()
    for level in levels("arithmetic"):
        for split in ("train", "test"):
            for ex in task.examples(split, 25, seed=3, difficulty=level):
                assert "*" not in ex.prompt
                assert task.score(ex.solution, ex.answer) == 1.0, ex
                assert task.score(ex.wrong_solution, ex.answer) == 0.0, ex
                think, _ = _THINK.fullmatch(ex.solution).groups()
                assert think.split(STEP_SEPARATOR) == ex.solution_steps
                labels = ex.step_labels
                assert len(labels) == len(ex.steps) and False in labels
                assert labels == sorted(labels, reverse=True)
                first_wrong = labels.index(False)
                assert ex.steps[:first_wrong] == ex.solution_steps[:first_wrong]
                assert ex.steps[first_wrong] != ex.solution_steps[first_wrong]


def test_column_trace_two_digit_level():
    task = _columns()
    exs = task.examples("train", 200, seed=0, difficulty=2)
    for ex in exs:
        m = re.fullmatch(r"What is (\d\d)([+-])(\d\d)\?", ex.prompt)
        assert m, ex.prompt
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert int(ex.answer) == (a + b if op == "+" else a - b) >= 0  # never negative
        # Two column steps, then the restated operation with its result.
        assert len(ex.solution_steps) == 3
        assert ex.solution_steps[-1] == f"{a}{op}{b}={ex.answer}"
        # The wrong trace slips exactly one column, so its result is off by 1 or 10.
        assert abs(int(extract_answer(ex.wrong_solution)) - int(ex.answer)) in (1, 10)
    assert {e.prompt[10] for e in exs} == {"+", "-"}
    # Held-out problems: thousands of them, disjoint from train, same structure.
    test = task.examples("test", 2000, seed=0, difficulty=2)
    assert len({e.prompt for e in test}) == 2000
    assert not {e.prompt for e in test} & {
        e.prompt for e in task.examples("train", 2000, seed=0, difficulty=2)
    }


def test_arithmetic_options_keep_defaults_and_reject_bad_values():
    default = [e.to_row() for e in get_task("arithmetic").examples("train", 50, seed=1)]
    explicit = [
        e.to_row() for e in get_task("arithmetic", operators="", trace="ops").examples("train", 50, seed=1)
    ]
    assert default == explicit
    plus = get_task("arithmetic", operators="+").examples("train", 30, seed=0, difficulty=3)
    assert all("-" not in e.prompt and "*" not in e.prompt for e in plus)
    with pytest.raises(ConfigError, match="operators must be a subset"):
        get_task("arithmetic", operators="/")
    with pytest.raises(ConfigError, match="trace must be"):
        get_task("arithmetic", trace="digits")
    with pytest.raises(ConfigError, match="leave none of difficulty 1"):
        get_task("arithmetic", operators="*").examples("train", 1, difficulty=1)


def test_column_trace_rows_for_every_kind():
    for kind in ROW_KINDS:
        rows = task_rows(_columns(), "train", 6, seed=0, kind=kind, difficulty=2)
        validate_rows(rows, kind, source="task_rows")
