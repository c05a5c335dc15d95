"""RewardRunner: weighted sums, None semantics, and failures as counted exclusions."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch

from posttrain.data.rewards import RewardRunner, build_reward
from posttrain.errors import ConfigError, RewardError

P = ["p0", "p1", "p2", "p3"]
C = ["a", "bb", "ccc", "dddd"]


def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def from_column(prompts, completions, *, bonus):
    # no **columns: the runner must pass only the columns this function names
    return list(bonus)


def test_weighted_sum_hand_arithmetic():
    runner = RewardRunner(
        [("len", length, 0.5), ("bonus", from_column, 2.0)], timeout_s=5, max_error_rate=0.0
    )
    res = runner.score(P, C, {"bonus": [1.0, 0.0, -1.0, None], "unused": [0, 0, 0, 0]})
    # 0.5*len + 2*bonus: [0.5+2, 1+0, 1.5-2, 2+nothing]
    assert torch.allclose(res.scores, torch.tensor([2.5, 1.0, -0.5, 2.0]))
    assert res.valid.all()
    assert res.errors == {"len": 0, "bonus": 0}
    assert torch.isnan(res.per_reward["bonus"][3]) and res.per_reward["len"][3] == 4.0


def test_sample_no_reward_applies_to_is_excluded_but_not_an_error():
    runner = RewardRunner(
        [("r", lambda p, c, **k: [1.0, None, 0.0, None], 1.0)], timeout_s=5, max_error_rate=0.0
    )
    res = runner.score(P, C)
    assert res.valid.tolist() == [True, False, True, False]
    assert math.isnan(res.scores[1]) and res.scores[2] == 0.0
    assert res.errors == {"r": 0}


def _boom(prompts, completions, **columns):
    raise ValueError("verifier exploded\nsecond line")


def test_raising_reward_excludes_samples_and_counts(caplog):
    runner = RewardRunner([("len", length, 1.0), ("boom", _boom, 1.0)], timeout_s=5, max_error_rate=1.0)
    with caplog.at_level("WARNING"):
        res = runner.score(P, C)
    assert not res.valid.any() and torch.isnan(res.scores).all()  # excluded, not scored 0
    assert res.errors == {"len": 0, "boom": 4}
    assert res.messages["boom"] == "sample 0: ValueError: verifier exploded"  # each sample alone raised
    assert "boom" in caplog.text


def test_hanging_reward_times_out_within_deadline():
    release = threading.Event()

    def hang(prompts, completions, **columns):
        release.wait(30)
        return [0.0] * len(completions)

    runner = RewardRunner([("len", length, 1.0), ("hang", hang, 1.0)], timeout_s=0.5, max_error_rate=1.0)
    t0 = time.monotonic()
    res = runner.score(P, C)
    assert time.monotonic() - t0 < 1.5
    assert res.errors["hang"] == 4 and "timed out" in res.messages["hang"]
    assert not res.valid.any()
    assert len(runner.abandoned_threads) == 5  # the batch call, then each sample alone
    release.set()


@pytest.mark.parametrize(
    "bad, n_err",
    [
        (lambda p, c, **k: [1.0] * (len(c) - 1), 4),  # wrong length
        (lambda p, c, **k: "1.0", 4),  # wrong container type
        (lambda p, c, **k: [1.0, "x", 2.0, 3.0], 1),  # wrong element type
        (lambda p, c, **k: [1.0, float("nan"), 2.0, float("inf")], 2),  # non-finite
    ],
    ids=["length", "container", "element", "nonfinite"],
)
def test_malformed_outputs_are_errors(bad, n_err):
    runner = RewardRunner([("bad", bad, 1.0)], timeout_s=5, max_error_rate=1.0)
    res = runner.score(P, C)
    assert res.errors == {"bad": n_err}
    assert int((~res.valid).sum()) == n_err


def test_tensor_and_bool_outputs_are_accepted():
    runner = RewardRunner([("t", lambda p, c, **k: torch.tensor([1.0, 0.0, 1.0, 0.0]), 1.0)], timeout_s=5)
    assert runner.score(P, C).scores.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_error_rate_above_budget_raises():
    half = lambda p, c, **k: [1.0, "x", "y", 1.0]
    runner = RewardRunner([("half", half, 1.0)], timeout_s=5, max_error_rate=0.25)
    with pytest.raises(RewardError, match=r"2/4 samples \(50% > max_error_rate 25%\)"):
        runner.score(P, C)
    RewardRunner([("half", half, 1.0)], timeout_s=5, max_error_rate=0.5).score(P, C)  # at the limit: fine


def test_async_rewards_run_on_background_loop_and_time_out():
    async def slow_ok(prompts, completions, **columns):
        await asyncio.sleep(0.05)
        return [2.0] * len(completions)

    async def never(prompts, completions, **columns):
        await asyncio.sleep(60)

    runner = RewardRunner([("ok", slow_ok, 1.0), ("never", never, 1.0)], timeout_s=0.5, max_error_rate=1.0)
    t0 = time.monotonic()
    res = runner.score(P, C)
    assert time.monotonic() - t0 < 1.5
    assert res.per_reward["ok"].tolist() == [2.0] * 4
    assert res.errors == {"ok": 0, "never": 4}


def test_rewards_run_in_parallel():
    def sleepy(prompts, completions, **columns):
        time.sleep(0.4)
        return [1.0] * len(completions)

    runner = RewardRunner([(f"s{i}", sleepy, 1.0) for i in range(3)], timeout_s=5, max_workers=3)
    t0 = time.monotonic()
    res = runner.score(P, C)
    assert time.monotonic() - t0 < 1.0  # serial would take 1.2 s
    assert res.scores.tolist() == [3.0] * 4


def test_callable_from_inside_asyncio():
    runner = RewardRunner([("len", length, 1.0)], timeout_s=5)

    async def main():
        return await asyncio.to_thread(runner.score, P, C)

    assert asyncio.run(main()).scores.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_runner_with_built_rewards():
    runner = RewardRunner(
        [("format", build_reward("format"), 1.0), ("rep", build_reward("repetition", ngram_size=1), 0.5)],
        timeout_s=5,
    )
    res = runner.score(["", ""], ["<think>a b</think><answer>c</answer>", "x x x x"])
    # rep (unigram): "<think>a b</think><answer>c</answer>" splits into 2 distinct words -> 0;
    # "x x x x": 1 - 1/4 = 0.75 -> -0.75 * 0.5
    assert res.scores.tolist() == pytest.approx([1.0, -0.375])


def test_config_errors():
    with pytest.raises(ConfigError):
        RewardRunner([])
    with pytest.raises(ConfigError, match="unique"):
        RewardRunner([("a", length, 1.0), ("a", length, 1.0)])
    with pytest.raises(ConfigError, match="weight"):
        RewardRunner([("a", length, float("nan"))])
    runner = RewardRunner([("a", length, 1.0)])
    with pytest.raises(RewardError, match="column 'x' has 1 entries for 4"):
        runner.score(P, C, {"x": [1]})


def test_close_releases_reward_resources():
    closed = []

    class Closable:
        def __call__(self, prompts, completions, **columns):
            return [0.0] * len(completions)

        def close(self):
            closed.append(True)

    runner = RewardRunner([("c", Closable(), 1.0), ("len", length, 1.0)], timeout_s=5)
    assert runner.score(P, C).scores.tolist() == [1.0, 2.0, 3.0, 4.0]
    runner.close()
    assert closed == [True]
