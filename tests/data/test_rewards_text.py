"""Text rewards: format, lengths (linear, Kimi k1.5, DAPO overlong), repetition, language, task."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.rewards import build_reward
from posttrain.data.rewards.text import (
    dapo_overlong_value,
    kimi_length_values,
    repetition_rate,
    script_words,
    think_text,
)
from posttrain.errors import ConfigError, RewardError

# ------------------------------------------------------------------ format


def test_format_reward_cases():
    f = build_reward("format")
    completions = [
        "<think>7+5=12</think><answer>12</answer>",
        "  <think>a</think>\n<answer>b</answer>\n",
        "<think>a</think>",  # no answer
        "<answer>12</answer>",  # no reasoning
        "<think></think><answer>12</answer>",  # empty reasoning
        "<think>a</think><answer>1</answer> trailing text",
        "<think>a<think>b</think><answer>1</answer>",  # nested open tag
        "<think>a</think><answer>1</answer><answer>2</answer>",  # two answers
    ]
    assert f([""] * len(completions), completions) == [1, 1, 0, 0, 0, 0, 0, 0]


def test_format_reward_with_think_opened_by_template():
    f = build_reward("format")
    assert f(["user: 7+5?\nassistant: <think>"], ["7+5=12</think><answer>12</answer>"]) == [1.0]
    assert f(["user: 7+5?\nassistant:"], ["7+5=12</think><answer>12</answer>"]) == [0.0]


def test_format_reward_without_answer_requirement():
    f = build_reward("format", require_answer=False)
    assert f(["", ""], ["<think>a</think>the answer is 3", "no tags"]) == [1.0, 0.0]


# ------------------------------------------------------------------ lengths


def test_length_linear_hand_arithmetic():
    f = build_reward("length_linear", coef=0.01)
    assert f(["", ""], ["abcd", "ab"]) == pytest.approx([-0.04, -0.02])
    # token counts from the trainer take precedence over characters
    assert f(["", ""], ["abcd", "ab"], response_length=[10, 3]) == pytest.approx([-0.1, -0.03])


def test_kimi_length_hand_arithmetic():
    # One group of 4: lengths 10, 20, 30, 50 -> min 10, max 50, span 40.
    # lambda = 0.5 - (len - 10) / 40 = [0.5, 0.25, 0.0, -0.5]
    # correct get lambda, wrong get min(0, lambda).
    lengths = [10, 20, 30, 50]
    correct = [True, False, True, False]
    assert kimi_length_values(lengths, correct, [0, 0, 0, 0]) == pytest.approx([0.5, 0.0, 0.0, -0.5])
    correct = [False, True, False, True]
    assert kimi_length_values(lengths, correct, [0, 0, 0, 0]) == pytest.approx([0.0, 0.25, 0.0, -0.5])


def test_kimi_length_equal_lengths_and_groups():
    # The report's rule: max_len == min_len -> zero for the whole group.
    assert kimi_length_values([7, 7], [True, False], ["a", "a"]) == [0.0, 0.0]
    # Two groups are normalised separately; None correctness stays None and is ignored.
    out = kimi_length_values([1, 3, 100, 5, 9], [True, True, None, True, True], [0, 0, 0, 1, 1])
    assert out[2] is None
    assert out[0] == pytest.approx(0.5) and out[1] == pytest.approx(-0.5)
    assert out[3] == pytest.approx(0.5) and out[4] == pytest.approx(-0.5)


def test_kimi_length_reward_uses_column_or_correctness_reward():
    f = build_reward("kimi_length", group_size=2)
    out = f(["", ""] * 2, ["a", "aaa", "bb", "b"], correct=[1.0, 1.0, 0.0, 1.0])
    # group 0: lengths 1,3 -> lambda 0.5,-0.5 ; group 1: lengths 2,1 -> lambda -0.5 (wrong -> -0.5), 0.5
    assert out == pytest.approx([0.5, -0.5, -0.5, 0.5])
    g = build_reward("kimi_length", correctness=lambda p, c, **k: [1.0 if "x" in s else 0.0 for s in c])
    assert g(["", ""], ["xx", "yyyy"], group_id=[3, 3]) == pytest.approx([0.5, -0.5])
    with pytest.raises(RewardError, match="group"):
        build_reward("kimi_length")([""], ["a"], correct=[1.0])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 500), min_size=2, max_size=8),
    st.data(),
)
def test_kimi_length_properties(lengths, data):
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    gid = [0] * len(lengths)
    out = kimi_length_values(lengths, correct, gid)
    assert all(-0.5 - 1e-12 <= v <= 0.5 + 1e-12 for v in out)
    assert all(v <= 0 for v, c in zip(out, correct) if not c)  # wrong answers never gain
    # shifting every length of the group by a constant changes nothing
    shift = data.draw(st.integers(0, 1000))
    assert kimi_length_values([n + shift for n in lengths], correct, gid) == pytest.approx(out)
    # permutation equivariance
    perm = list(range(len(lengths)))
    random.Random(len(lengths)).shuffle(perm)
    permuted = kimi_length_values([lengths[i] for i in perm], [correct[i] for i in perm], gid)
    assert permuted == pytest.approx([out[i] for i in perm])
    # among correct answers, shorter is never worse
    pairs = [(lengths[i], out[i]) for i in range(len(lengths)) if correct[i]]
    for la, va in pairs:
        for lb, vb in pairs:
            if la < lb:
                assert va >= vb


def test_dapo_overlong_hand_arithmetic():
    # L_max = 100, L_cache = 20: free up to 80, linear to -1 at 100, -1 beyond.
    assert [dapo_overlong_value(n, 100, 20) for n in (50, 80, 85, 90, 100, 101)] == pytest.approx(
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    )
    f = build_reward("dapo_overlong", max_length=100, cache_length=20)
    assert f(["", ""], ["x", "y"], response_length=[90, 10]) == pytest.approx([-0.5, 0.0])
    with pytest.raises(ConfigError):
        build_reward("dapo_overlong", max_length=10, cache_length=20)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.lists(st.integers(0, 500), min_size=2, max_size=10))
def test_dapo_overlong_monotone_and_bounded(cache, extra, lengths):
    max_len = cache + extra
    vals = [dapo_overlong_value(n, max_len, cache) for n in sorted(lengths)]
    assert all(-1.0 <= v <= 0.0 for v in vals)
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# ------------------------------------------------------------------ repetition


def test_repetition_hand_arithmetic():
    # words a b a b a b, bigrams: ab ba ab ba ab -> 5 total, 2 distinct -> rate 1 - 2/5 = 0.6
    assert repetition_rate("a b a b a b".split(), 2) == pytest.approx(0.6)
    assert repetition_rate("a b c d".split(), 2) == 0.0
    assert repetition_rate(["a"], 4) == 0.0
    f = build_reward("repetition", ngram_size=2, coef=0.5)
    assert f(["", ""], ["a b a b a b", "one two three"]) == pytest.approx([-0.3, 0.0])
    assert build_reward("repetition", ngram_size=3, unit="char")([""], ["aaaaa"]) == pytest.approx(
        [-(1 - 1 / 3)]
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from("abcde"), max_size=40), st.integers(1, 5))
def test_repetition_rate_bounds(units, n):
    r = repetition_rate(units, n)
    assert 0.0 <= r < 1.0
    if len(set(zip(*[units[i:] for i in range(n)]))) == max(len(units) - n + 1, 0):
        assert r == 0.0


# ------------------------------------------------------------------ language


def test_script_words_and_language_share():
    assert script_words("hello world") == ["latin", "latin"]
    assert script_words("你好 world") == ["cjk", "cjk", "latin"]
    f = build_reward("language", target="latin")
    out = f(
        ["", "", "", ""],
        [
            "<think>first add the numbers</think><answer>12</answer>",
            "<think>first 加 the numbers</think><answer>12</answer>",  # 3 latin words + 1 CJK char
            "<think>12+3=15</think><answer>15</answer>",  # no letters: not applicable
            "no think block at all",
        ],
    )
    assert out == pytest.approx([1.0, 0.75, None, 1.0]) if out[2] is None else False
    assert build_reward("language", target="cjk")([""], ["<think>你好</think>"]) == [1.0]
    with pytest.raises(ConfigError):
        build_reward("language", target="klingon")


def test_language_only_looks_at_reasoning():
    f = build_reward("language", target="latin")
    assert f([""], ["<think>думаю</think><answer>answer</answer>"]) == [0.0]
    assert think_text("x <think>", "abc</think>rest") == "abc"


# ------------------------------------------------------------------ task


class _EchoTask:
    """A minimal verifier: correct iff the <answer> payload equals the answer."""

    def score(self, completion: str, answer: str) -> float:
        import re

        m = re.findall(r"<answer>(.*?)</answer>", completion)
        return float(bool(m) and m[-1].strip() == answer)


def test_task_reward_uses_task_verifier():
    f = build_reward("task", task=_EchoTask())
    out = f(["", "", ""], ["<answer>3</answer>", "<answer>4</answer>", "x"], answer=["3", "3", None])
    assert out == [1.0, 0.0, None]
    with pytest.raises(RewardError, match="answer"):
        f([""], ["x"])


def test_task_reward_by_name():
    from posttrain.data.tasks import get_task

    task = get_task("arithmetic")
    ex = task.examples("test", 2, seed=0)
    for options in ({"task_name": "arithmetic"}, {"task": "arithmetic"}):  # YAML configs pass a name
        f = build_reward("task", **options)
        out = f(["", ""], [ex[0].solution, ex[0].wrong_solution], answer=[ex[0].answer, ex[0].answer])
        assert out == [1.0, 0.0]
