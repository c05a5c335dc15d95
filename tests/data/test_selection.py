"""Data selection: curriculum order, Kimi success-rate sampling, best-of-k filter, decontamination."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.selection import (
    Curriculum,
    SuccessRateSampler,
    decontaminate,
    difficulty_filter,
    normalize_text,
)
from posttrain.data.tasks import get_task
from posttrain.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------


def test_curriculum_levels_by_hand():
    # 3 levels, 100 steps, ramp over the first 60: stage = min(2, floor(3 * s / 60)).
    cur = Curriculum([1, 1, 2, 2, 3, 3], total_steps=100, ramp_fraction=0.6)
    assert [cur.level(s) for s in (0, 19, 20, 39, 40, 99)] == [1, 1, 2, 2, 3, 3]
    assert cur.eligible(0) == [0, 1]
    assert cur.eligible(25) == [0, 1, 2, 3]
    assert cur.eligible(99) == list(range(6))
    staged = Curriculum([1, 1, 2, 2, 3, 3], total_steps=100, ramp_fraction=0.6, mode="staged")
    assert staged.eligible(25) == [2, 3]


def test_curriculum_samples_easy_to_hard_on_a_task():
    examples = get_task("arithmetic").examples("train", 100, seed=0)
    cur = Curriculum([e.difficulty for e in examples], total_steps=50, ramp_fraction=1.0)
    means = []
    for step in range(50):
        picked = cur.sample(step, 8)
        assert len(set(picked)) == 8
        assert all(examples[i].difficulty <= cur.level(step) for i in picked)
        means.append(sum(examples[i].difficulty for i in picked) / 8)
    # The mean difficulty of the batches rises from the first fifth to the last.
    assert sum(means[:10]) / 10 < sum(means[-10:]) / 10 - 1.0
    assert cur.sample(17, 8) == Curriculum([e.difficulty for e in examples], 50, ramp_fraction=1.0).sample(
        17, 8
    )


def test_curriculum_argument_errors():
    with pytest.raises(ConfigError, match="ramp_fraction"):
        Curriculum([1, 2], 10, ramp_fraction=0)
    with pytest.raises(ConfigError, match="mode"):
        Curriculum([1, 2], 10, mode="random")
    with pytest.raises(DataError, match="no items"):
        Curriculum([], 10)


# ---------------------------------------------------------------------------------------
# Success-rate sampler
# ---------------------------------------------------------------------------------------


def test_probabilities_by_hand():
    s = SuccessRateSampler(["a", "b", "c", "d"])
    # a: 1/4 solved, b: 3/4, c: 0/2, d unseen (prior 0) -> weights 0.75, 0.25, 1, 1 (sum 3).
    s.update(["a"] * 4 + ["b"] * 4 + ["c"] * 2, [1, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    probs = s.probabilities()
    assert probs == pytest.approx({"a": 0.25, "b": 0.25 / 3, "c": 1 / 3, "d": 1 / 3})
    assert s.success_rate("b") == 0.75 and s.weight("d") == 1.0


def test_sampling_frequencies_proportional_to_one_minus_success():
    s = SuccessRateSampler(["a", "b", "c"], seed=1)
    s.update(["a", "a", "b", "b", "c", "c"], [0, 0, 1, 0, 1, 0])  # weights 1, .5, .5
    n = 6000
    counts = Counter(pid for _ in range(n) for pid in s.sample(1))
    expected = {"a": 0.5, "b": 0.25, "c": 0.25}
    for pid, p in expected.items():
        # 5 standard errors of a binomial proportion: fails only if the law is wrong.
        assert abs(counts[pid] / n - p) < 5 * math.sqrt(p * (1 - p) / n), counts
    with_replacement = Counter(s.sample(n, replace=True))
    for pid, p in expected.items():
        assert abs(with_replacement[pid] / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_retirement_and_exhaustion():
    s = SuccessRateSampler(["a", "b", "c"], min_attempts=2)
    s.update(["a"], [1])  # solved once, below min_attempts: weight 0 but not retired
    assert "a" not in s.retired and s.weight("a") == 0.0
    s.update(["a", "b", "b"], [1, 1, 0])
    assert s.retired == {"a"}
    for _ in range(50):
        assert "a" not in s.sample(2)
    batch = s.sample(5)
    assert set(batch) == {"b", "c"} and len(batch) == 5  # fills with repeats when few remain
    s.update(["b", "b", "c", "c"], [1, 1, 1, 1])  # b: 3/4 stays; c: 2/2 retires
    assert s.retired == {"a", "c"}
    assert s.sample(3, candidates=["b", "c"]) == ["b"] * 3
    strict = SuccessRateSampler(["x"], exhausted="error")
    strict.update(["x"], [True])
    with pytest.raises(DataError, match="every candidate prompt is retired"):
        strict.sample(1)
    lenient = SuccessRateSampler(["x", "y"])
    lenient.update(["x", "y"], [1, 1])
    assert sorted(lenient.sample(2)) == ["x", "y"] and not lenient.retired  # a fresh pass


def test_decay_forgets_old_outcomes():
    s = SuccessRateSampler(["a"], decay=0.5, retire_threshold=2.0)
    s.update(["a", "a"], [0, 0])  # attempts 2, successes 0
    s.update(["a", "a"], [1, 1])  # attempts 0.5*2+2 = 3, successes 2
    assert s.success_rate("a") == pytest.approx(2 / 3)


def test_state_round_trip_resumes_exactly():
    ids = [f"p{i}" for i in range(20)]

    def run(sampler, steps):
        out = []
        for t in range(steps):
            batch = sampler.sample(4)
            sampler.update(batch, [(int(pid[1:]) + t) % 3 == 0 for pid in batch])
            out.append(batch)
        return out

    full = SuccessRateSampler(ids, seed=5, min_attempts=2)
    first = run(full, 10)
    rest = run(full, 10)
    half = SuccessRateSampler(ids, seed=5, min_attempts=2)
    assert run(half, 10) == first
    state = json.loads(json.dumps(half.state_dict()))  # must survive a JSON checkpoint
    resumed = SuccessRateSampler(ids, seed=5, min_attempts=2)
    resumed.load_state_dict(state)
    assert run(resumed, 10) == rest
    with pytest.raises(DataError, match="different set of prompt ids"):
        SuccessRateSampler(ids[:3]).load_state_dict(state)


def test_sampler_input_errors():
    with pytest.raises(DataError, match="appears more than once"):
        SuccessRateSampler(["a", "a"])
    s = SuccessRateSampler(["a"])
    with pytest.raises(DataError, match="unknown prompt id 'z'"):
        s.update(["z"], [1])
    with pytest.raises(DataError, match="1 ids but 2 successes"):
        s.update(["a"], [1, 0])
    with pytest.raises(DataError, match="outside"):
        s.update(["a"], [2])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5)), min_size=1, max_size=6))
def test_probabilities_property(outcomes):
    # Property: probabilities sum to 1 and order prompts by 1 - success rate.
    ids = [f"q{i}" for i in range(len(outcomes))]
    s = SuccessRateSampler(ids, retire_threshold=2.0)
    for pid, (wins, tries) in zip(ids, outcomes):
        wins = min(wins, tries)
        s.update([pid] * tries, [1] * wins + [0] * (tries - wins))
    probs = s.probabilities()
    assert sum(probs.values()) == pytest.approx(1.0)
    for a in ids:
        for b in ids:
            if (
                s.success_rate(a) < s.success_rate(b)
                and s.weight(a) > 0
                and sum(s.weight(p) for p in ids) > 0
            ):
                assert probs[a] > probs[b]


# ---------------------------------------------------------------------------------------
# Difficulty filter
# ---------------------------------------------------------------------------------------


def test_difficulty_filter_keeps_prompts_failed_k_times():
    items = ["easy", "hard", "medium", "impossible"]
    known = {"easy": 8, "hard": 1, "medium": 4, "impossible": 0}
    calls = []

    def count(batch, k):
        calls.append((list(batch), k))
        return [known[x] for x in batch]

    result = difficulty_filter(items, count, k=8)
    assert result.kept == ["impossible"] and result.kept_indices == [3]
    assert result.counts == [8, 1, 4, 0] and calls == [(items, 8)]
    assert difficulty_filter(items, count, k=8, max_successes=7).kept == ["hard", "medium", "impossible"]
    assert difficulty_filter(items, count, k=8, min_successes=1, max_successes=4).kept == ["hard", "medium"]


def test_difficulty_filter_with_a_stochastic_solver():
    # A model-agnostic solver: solves task prompts by the verifier with a difficulty-dependent rate.
    import random

    task = get_task("arithmetic")
    examples = task.examples("train", 60, seed=0)
    rng = random.Random(0)

    def count(batch, k):
        counts = []
        for ex in batch:
            p_solve = {1: 1.0, 2: 0.9, 3: 0.5, 4: 0.1, 5: 0.0}[ex.difficulty]
            tries = [ex.solution if rng.random() < p_solve else ex.wrong_solution for _ in range(k)]
            counts.append(int(sum(task.score(t, ex.answer) for t in tries)))
        return counts

    result = difficulty_filter(examples, count, k=8)
    assert result.kept and all(ex.difficulty >= 3 for ex in result.kept)
    assert all(ex.difficulty < 5 for i, ex in enumerate(examples) if i not in result.kept_indices)


def test_difficulty_filter_errors():
    with pytest.raises(DataError, match="returned 1 counts for 2 items"):
        difficulty_filter(["a", "b"], lambda b, k: [0])
    with pytest.raises(DataError, match="item 1 has success count 9"):
        difficulty_filter(["a", "b"], lambda b, k: [0, 9], k=8)
    with pytest.raises(ConfigError, match="min_successes"):
        difficulty_filter(["a"], lambda b, k: [0], k=4, min_successes=3, max_successes=2)


# ---------------------------------------------------------------------------------------
# Decontamination
# ---------------------------------------------------------------------------------------


def test_decontamination_kinds_by_hand():
    long_eval = "the quick brown fox jumps over the lazy dog near the old river bank today"
    train = [
        "What is 2+2?",  # exact
        "what  is\t3+3? ",  # normalized (whitespace + case)
        "Yesterday the quick brown fox jumps over the lazy dog near the old river bank today again",  # 13-gram
        "Something else entirely",
        "the quick brown fox jumps over the lazy dog",  # shorter than 13 words: no n-gram test
    ]
    evals = ["What is 2+2?", "What is 3+3?", long_eval]
    report = decontaminate(train, evals)
    kinds = {o.train_index: (o.kind, o.eval_index) for o in report.overlaps}
    assert kinds == {0: ("exact", 0), 1: ("normalized", 1), 2: ("ngram", 2)}
    assert report.contaminated_train == [0, 1, 2] and report.clean_train == [3, 4]
    assert report.contaminated_eval == [0, 1, 2]
    assert report.counts() == {"exact": 1, "normalized": 1, "ngram": 1}
    assert report.summary().startswith("3 of 5 training prompts overlap 3 of 3 eval prompts")
    assert decontaminate(train, evals, ngram=5).overlaps[-1].train_index == 4
    assert [o.train_index for o in decontaminate(train, evals, casefold=False).overlaps] == [0, 2]
    assert normalize_text("  A\n b ") == "a b"


def test_task_splits_are_clean_and_a_leak_is_found():
    arith = get_task("arithmetic")
    train = [e.prompt for e in arith.examples("train", 300, seed=0)]
    test = [e.prompt for e in arith.examples("test", 100, seed=0)]
    assert decontaminate(train, test).overlaps == []
    leaked = train + [" " + test[5].upper()]
    report = decontaminate(leaked, test)
    assert [(o.train_index, o.eval_index, o.kind) for o in report.overlaps] == [(300, 5, "normalized")]
    # Templated prompts share long template n-grams: the n-gram test reports template reuse,
    # while exact/normalized matching finds no shared problem across the task's splits.
    words = get_task("word_problems")
    train = [e.prompt for e in words.examples("train", 300, seed=0)]
    test = [e.prompt for e in words.examples("test", 100, seed=0)]
    assert decontaminate(train, test, ngram=None).overlaps == []
    assert {o.kind for o in decontaminate(train, test).overlaps} == {"ngram"}
