"""Reward errors in the RL loop (issue #22): absurd scores are counted in the step's metrics
and, past rewards' max_error_rate, stop the run."""

from __future__ import annotations

import pytest

from posttrain.data.rewards import REWARDS
from posttrain.errors import RewardError
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config


def test_absurd_scores_reach_the_rl_metrics_and_stop_the_run(tmp_path):
    if "test_absurd" not in REWARDS:
        REWARDS.register("test_absurd")(
            lambda **o: lambda p, c, **k: [1e38 if i % 4 == 0 else 0.5 for i in range(len(c))]
        )
    trainer = RLTrainer(tiny_config(tmp_path / "a", "grpo", "rewards=[{name: test_absurd}]"))
    m = trainer.step()  # 4 prompts x G=4: one sample in four is absurd
    assert m["reward/errors_test_absurd"] == 4 and m["reward/valid_frac"] == pytest.approx(0.75)
    strict = tiny_config(
        tmp_path / "b", "grpo", "rewards=[{name: test_absurd}]", "reward_exec.max_error_rate=0.2"
    )
    with pytest.raises(RewardError, match="max_error_rate"):
        RLTrainer(strict).step()
