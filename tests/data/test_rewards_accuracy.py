"""The accuracy reward: extraction, math-verify + exact double check, and the hard budget
(worker processes killed from any thread / asyncio without touching the caller's timers)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from posttrain.data.rewards import build_reward
from posttrain.data.rewards.accuracy import MathVerifyPool
from posttrain.data.rewards.math_verifier import check, extract_prediction
from posttrain.errors import RewardError

BUDGET = 1.0
ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
    r"\boxed{" + "1+" * 500_000 + "1}",  # ~1 MB
]


@pytest.fixture(scope="module")
def acc():
    f = build_reward("accuracy", budget_s=BUDGET, num_workers=2)
    f.pool.wait_ready()  # pay the workers' start-up once
    yield f
    f.close()


# ------------------------------------------------------------------ extraction & verdicts (in-process)


def test_extract_prediction_modes():
    assert extract_prediction("<think>41</think><answer>42</answer>") == ("payload", "42")
    assert extract_prediction("<think>still thinking 42") is None
    assert extract_prediction("6*7=42</think><answer>42</answer>", think_open=True) == ("payload", "42")
    assert extract_prediction("6*7=42", think_open=True) is None
    assert extract_prediction("the answer is 42") == ("text", "the answer is 42")
    assert extract_prediction("<answer>  </answer>") is None
    assert extract_prediction("<think>a</think><answer>7") == ("payload", "7")  # truncated tag


@pytest.mark.parametrize(
    "gold, completion, expected",
    [
        ("42", "<think>6*7=42</think><answer>42</answer>", 1.0),
        ("42", "<think>6*7=41? no, 42</think><answer>41</answer>", 0.0),  # reasoning is not the answer
        ("3/4", "<answer>3/4</answer>", 1.0),
        (r"\frac{3}{4}", r"<answer>0.75</answer>", 1.0),
        ("1/2", r"So we get $\boxed{\frac{1}{2}}$.", 1.0),
        ("12", "after all that, the final answer is 12", 1.0),  # bare final number
        ("12", "<think>so 12", 0.0),  # never left the reasoning
        (r"4\sqrt{2}", r"<answer>4\sqrt{2}</answer>", 1.0),
        ("1000", "<answer>1,000</answer>", 1.0),
    ],
)
def test_check_verdicts(gold, completion, expected):
    assert check(gold, completion) == expected


def test_known_false_positives_are_scored_correctly():
    # math-verify alone: 1/2^99 == 1/2^98 (numeric comparison rounds both to 0).
    from math_verify import parse, verify

    g, p = (
        parse("$\\frac{1}{2^{99}}$", parsing_timeout=None),
        parse("$\\frac{1}{2^{98}}$", parsing_timeout=None),
    )
    assert verify(g, p, timeout_seconds=None) is True  # the upstream false positive
    assert check(r"\frac{1}{2^{99}}", r"<answer>\frac{1}{2^{98}}</answer>") == 0.0
    assert check(r"\frac{1}{2^{99}}", r"<answer>2^{-99}</answer>") == 1.0
    assert check("1/2^99", r"$\boxed{1/2^{98}}$") == 0.0
    # 4 vs 4√2: a bare 4\sqrt{2} is read as 4 by the expression extractor; we parse
    # <answer> payloads as LaTeX first.
    assert verify(
        parse("4", parsing_timeout=None), parse(r"4\sqrt{2}", parsing_timeout=None), timeout_seconds=None
    )
    assert check("4", r"<answer>4\sqrt{2}</answer>") == 0.0
    assert check(r"4\sqrt{2}", r"<answer>4\sqrt{2}</answer>") == 1.0
    # decimals keep a relative tolerance instead of absolute rounding
    assert check("1e-9", r"<answer>2e-9</answer>") == 0.0
    assert check("0.5", r"<answer>1/2</answer>") == 1.0


# ------------------------------------------------------------------ the reward through the pool


def test_accuracy_reward_batch(acc):
    out = acc(
        ["q", "q <think>", "q", "q"],
        ["<think>a</think><answer>5</answer>", "2+3=5</think><answer>5</answer>", "<answer>6</answer>", "x"],
        answer=["5", "5", "5", None],
    )
    assert out == [1.0, 1.0, 0.0, None]
    with pytest.raises(RewardError, match="answer"):
        acc(["q"], ["x"])
    # an unparseable ground truth is "not applicable", not a wrong answer
    assert acc(["q"], [r"\boxed{5}"], answer=["$$"]) == [None]
    assert check("\\", "<answer>1</answer>") is None


@pytest.mark.parametrize("payload", ADVERSARIAL, ids=["tower", "nested_braces", "one_megabyte"])
def test_adversarial_answers_return_within_twice_budget_from_thread(acc, payload):
    acc.pool.wait_ready()  # measure the budget, not a replacement worker's start-up
    box = {}

    def work():
        t0 = time.monotonic()
        box["out"] = acc(["q"], [payload], answer=["4"])
        box["dt"] = time.monotonic() - t0

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert box["out"] == [0.0]
    assert box["dt"] < 2 * BUDGET + 0.5  # + a fresh worker's wait is not on this call's path


def test_caller_sigalrm_still_fires(acc):
    acc.pool.wait_ready()
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))
    try:
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        out = acc(["q"], [ADVERSARIAL[0]], answer=["4"])
        dt = time.monotonic() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert out == [0.0]
    assert dt < 2 * BUDGET + 0.5
    assert len(fired) == 1 and 0.25 <= fired[0] - t0 <= 0.9  # on time, not after the check


def test_from_asyncio_loop_timers_keep_time(acc):
    acc.pool.wait_ready()

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fired = []
        loop.call_later(0.3, lambda: fired.append(loop.time() - t0))
        out = await asyncio.to_thread(acc, ["q"], [ADVERSARIAL[0]], answer=["4"])
        return out, fired, loop.time() - t0

    out, fired, dt = asyncio.run(main())
    assert out == [0.0]
    assert dt < 2 * BUDGET + 0.5
    assert len(fired) == 1 and 0.25 <= fired[0] <= 0.9


def test_pool_recovers_after_timeout(acc):
    before = dict(acc.pool.stats)
    assert acc(["q"], [ADVERSARIAL[0]], answer=["4"]) == [0.0]
    assert acc.pool.stats["timeouts"] == before["timeouts"] + 1
    # the replacement worker answers correctly afterwards
    assert acc(["q", "q"], [r"\boxed{7}", r"\boxed{8}"], answer=["7", "7"]) == [1.0, 0.0]


def test_timeout_score_option_and_memory_cap():
    # timeout_score=None: an answer past the budget is "not applicable" instead of 0.
    # The 400 MB address-space cap bounds what an answer can make sympy allocate; whatever
    # happens (MemoryError, kill or timeout), the pool keeps working afterwards.
    with MathVerifyPool(
        num_workers=1, budget_s=0.5, timeout_score=None, error_score=None, memory_mb=400
    ) as pool:
        assert pool.check("4", ADVERSARIAL[0]) is None
        assert pool.check("1", r"<answer>2^{2^{33}}</answer>") is None
        assert pool.check("4", r"\boxed{4}") == 1.0
    with pytest.raises(RewardError, match="closed"):
        pool.check("1", "1")


def test_worker_that_cannot_start_is_an_infrastructure_error(monkeypatch):
    from posttrain.data.rewards import accuracy

    monkeypatch.setattr(accuracy, "_WORKER_SCRIPT", "/nonexistent/math_verifier.py")
    with MathVerifyPool(num_workers=1, budget_s=1.0, startup_timeout_s=10) as pool:
        with pytest.raises(RewardError, match="failed to start"):
            pool.check("1", r"\boxed{1}")
        with pytest.raises(RewardError, match="failed to start"):
            pool.wait_ready()
