"""Rewards under deadlines (issue #22): a slow or crashing sample fails alone, correct samples
keep their scores; absurd or non-finite scores are counted errors that reach max_error_rate
and the metrics."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from posttrain.data.rewards import RewardRunner
from posttrain.data.rewards.runner import MAX_ABS_REWARD
from posttrain.errors import ConfigError, RewardError

B = 16


def _batch(slow: set[int]) -> tuple[list[str], list[str]]:
    return [f"p{i}" for i in range(B)], ["slow" if i in slow else f"ok{i}" for i in range(B)]


def test_half_the_samples_hang_and_only_they_fail():
    release = threading.Event()

    def reward(prompts, completions, **columns):
        out = []
        for c in completions:
            if c == "slow":
                release.wait(60)  # "loops forever" as far as the deadline is concerned
            out.append(float(c[2:]) if c.startswith("ok") else 0.0)
        return out

    slow = set(range(0, B, 2))
    runner = RewardRunner([("r", reward, 1.0)], timeout_s=0.4, max_workers=8, max_error_rate=0.5)
    t0 = time.monotonic()
    res = runner.score(*_batch(slow))
    took = time.monotonic() - t0
    release.set()
    assert took < 0.4 + 2 * 0.4 + 1.0  # the batch call, then two waves of 8 samples alone
    assert res.errors == {"r": len(slow)} and "timed out" in res.messages["r"]
    assert res.valid.tolist() == [i not in slow for i in range(B)]
    for i in range(1, B, 2):
        assert res.scores[i] == float(i)  # the correct samples keep their scores


def test_one_crashing_sample_fails_alone():
    def reward(prompts, completions, **columns):
        if "slow" in completions:
            raise ValueError("cannot parse this one")
        return [1.0] * len(completions)

    res = RewardRunner([("r", reward, 1.0)], timeout_s=5, max_error_rate=0.1).score(*_batch({3}))
    assert res.errors == {"r": 1} and res.messages["r"] == "sample 3: ValueError: cannot parse this one"
    assert res.valid.tolist() == [i != 3 for i in range(B)] and res.scores[0] == 1.0


def test_past_the_error_budget_stops_early_and_raises():
    calls = []

    def reward(prompts, completions, **columns):
        calls.append(len(completions))
        raise RuntimeError("always")

    runner = RewardRunner([("r", reward, 1.0)], timeout_s=5, max_workers=1, max_error_rate=0.25)
    with pytest.raises(RewardError, match="16/16 samples"):
        runner.score(*_batch(set()))
    assert calls[0] == B and len(calls) == 1 + 5  # the batch, then alone until 5 > 0.25 * 16


def test_batch_dependent_reward_is_never_split():
    seen = []

    def grouped(prompts, completions, **columns):
        seen.append(len(completions))
        raise ValueError("group statistics failed")

    grouped.batch_dependent = True
    res = RewardRunner([("g", grouped, 1.0)], timeout_s=5, max_error_rate=1.0).score(*_batch(set()))
    assert seen == [B] and res.errors == {"g": B}


@pytest.mark.parametrize(
    "value", [1e38, -1e38, 1e39, MAX_ABS_REWARD * 1.01, float("inf"), float("-inf"), float("nan")]
)
def test_absurd_or_non_finite_scores_are_errors(value):
    values = [1.0] * 4
    values[2] = value
    res = RewardRunner([("r", lambda p, c, **k: values, 1.0)], timeout_s=5, max_error_rate=0.25).score(
        ["a"] * 4, ["b"] * 4
    )
    assert res.errors == {"r": 1} and res.valid.tolist() == [True, True, False, True]
    assert "sample 2" in res.messages["r"] and torch.isfinite(res.scores[[0, 1, 3]]).all()
    values[1] = value  # two of four: past max_error_rate 25%
    with pytest.raises(RewardError, match="2/4 samples"):
        RewardRunner([("r", lambda p, c, **k: values, 1.0)], timeout_s=5, max_error_rate=0.25).score(
            ["a"] * 4, ["b"] * 4
        )


def test_scores_at_the_bound_are_kept_and_weights_are_bounded():
    res = RewardRunner([("r", lambda p, c, **k: [MAX_ABS_REWARD, -MAX_ABS_REWARD], 1.0)]).score(
        ["a"] * 2, ["b"] * 2
    )
    assert res.valid.all() and res.scores.tolist() == [MAX_ABS_REWARD, -MAX_ABS_REWARD]
    with pytest.raises(ConfigError, match="within"):
        RewardRunner([("r", lambda p, c, **k: [0.0], 1e39)])


def test_code_reward_with_half_the_programs_looping_scores_every_sample():
    from posttrain.data.rewards import build_reward

    good = "```python\nprint(int(input()) * 2)\n```"
    loop = "```python\nwhile True:\n    pass\n```"
    completions = [loop if i % 2 == 0 else good for i in range(B)]
    tests = [[{"input": "21\n", "output": "42\n"}]] * B
    code = build_reward("code", cpu_time_s=1, wall_time_s=1.0, max_parallel=2)
    # The batch cannot finish in 2 s (8 loops x 1 s / 2 in parallel); each program alone can.
    runner = RewardRunner([("code", code, 1.0)], timeout_s=2.5, max_workers=4, max_error_rate=0.0)
    res = runner.score(["p"] * B, completions, {"tests": tests})
    assert res.errors == {"code": 0} and res.valid.all()
    assert res.scores.tolist() == [0.0 if i % 2 == 0 else 1.0 for i in range(B)]


def test_math_answers_that_exhaust_the_verifier_fail_alone():
    from posttrain.data.rewards import build_reward

    acc = build_reward("accuracy", budget_s=1.0, num_workers=2)
    acc.pool.wait_ready()
    try:
        n, slow = 32, set(range(0, 30, 5))  # 6 answers that each use the verifier's whole budget
        completions = [r"\boxed{9^{9^{9^{9}}}}" if i in slow else f"<answer>{i}</answer>" for i in range(n)]
        # The batch needs >= 6 x 1 s / 2 workers; each answer alone needs ~1 s.
        runner = RewardRunner([("acc", acc, 1.0)], timeout_s=2.5, max_workers=2, max_error_rate=0.0)
        res = runner.score(["q"] * n, completions, {"answer": [str(i) for i in range(n)]})
        assert res.errors == {"acc": 0} and res.valid.all()
        assert res.scores.tolist() == [0.0 if i in slow else 1.0 for i in range(n)]
    finally:
        acc.close()


def test_an_abandoned_call_is_told_to_stop():
    from posttrain.data.rewards.runner import cancel_event

    seen, stopped = [], threading.Event()

    def reward(prompts, completions, **columns):
        ev = cancel_event()
        seen.append(ev)
        if len(completions) > 1:  # the batch call: work until told to stop
            while not ev.is_set():
                time.sleep(0.01)
            stopped.set()
        return [1.0] * len(completions)

    assert cancel_event() is None
    res = RewardRunner([("r", reward, 1.0)], timeout_s=0.3, max_error_rate=0.0).score(*_batch(set()))
    assert res.valid.all() and stopped.wait(2.0)
    assert len(seen) == 1 + B and all(ev is not None for ev in seen)
