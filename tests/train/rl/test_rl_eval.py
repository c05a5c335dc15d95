"""Held-out evaluation on a user's dataset (issue #16, item 9): data.path + data.test_path
with no data.task is evaluated with rewards, and an evaluation that cannot run is refused
before any model is built."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError
from posttrain.train.config.rl import validate
from posttrain.train.rl.controller import RLTrainer
from rl_common import DIGIT_REWARD, tiny_config

TARGET_REWARD = "test_target_column"


def _register_target_reward():
    from posttrain.data.rewards import REWARDS

    if TARGET_REWARD not in REWARDS:
        # Reads the dataset's own `target` column: its eval mean is a hand number.
        REWARDS.register(TARGET_REWARD)(lambda **options: lambda prompts, completions, target, **c: target)


def _dataset(tmp_path):
    train = [{"prompt": f"{i}+1=", "answer": str(i + 1), "target": 0.0} for i in range(8)]
    test = [
        {"prompt": f"{i}+2=", "answer": str(i + 2), "target": t} for i, t in enumerate([1.0, 0.0, 1.0, 0.5])
    ]
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        f"data.path={tmp_path / 'train.jsonl'}",
        f"data.test_path={tmp_path / 'test.jsonl'}",
        "data.task=null",
    ]


def test_dataset_without_task_is_evaluated_with_the_runs_rewards(tmp_path):
    _register_target_reward()
    rewards = f"rewards=[{{name: {DIGIT_REWARD}}}, {{name: {TARGET_REWARD}, weight: 0.5}}]"
    cfg = tiny_config(
        tmp_path / "run", "grpo", *_dataset(tmp_path), rewards, "eval.before_after=true", "eval.n=3", steps=1
    )
    summary = RLTrainer(cfg).train()
    for key in ("eval_before", "eval_after"):
        ev = summary[key]
        assert ev["eval/reward/valid_frac"] == 1.0
        assert ev[f"eval/reward/{TARGET_REWARD}"] == pytest.approx(
            (1.0 + 0.0 + 1.0) / 3
        )  # first 3 held-out rows
        digits = ev[f"eval/reward/{DIGIT_REWARD}"]
        assert ev["eval/reward/mean"] == pytest.approx(digits + 0.5 * 2 / 3, abs=1e-6)


def test_named_eval_rewards_replace_the_runs_rewards(tmp_path):
    _register_target_reward()
    cfg = tiny_config(
        tmp_path / "run", "grpo", *_dataset(tmp_path), "eval.every=1", "eval.n=4",
        f"eval.rewards=[{{name: {TARGET_REWARD}}}]", steps=1,
    )  # fmt: skip
    trainer = RLTrainer(cfg)
    ev = trainer.evaluate()
    assert ev[f"eval/reward/{TARGET_REWARD}"] == pytest.approx(2.5 / 4)
    assert f"eval/reward/{DIGIT_REWARD}" not in ev


@pytest.mark.parametrize(
    "extra, message",
    [
        (["eval.before_after=true", "data.test_path=null"], "set data.test_path"),
        (["eval.every=2", "data.test_path=null"], "set data.test_path"),
        (["eval.rewards=[{name: format}]"], "eval.rewards is set but no evaluation runs"),
        (["eval.every=1", "eval.rewards=[{name: nonsense}]"], "eval.rewards[0].name"),
        (["eval.every=1", "eval.n=0"], "eval.n must be >= 1"),
    ],
)
def test_evaluation_that_cannot_run_is_refused_before_any_model(tmp_path, extra, message):
    cfg = tiny_config(tmp_path / "run", "grpo", *_dataset(tmp_path), *extra)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_task_without_held_out_prompts_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "run", "grpo", "eval.before_after=true")  # tiny_config: data.n_test=0
    with pytest.raises(ConfigError, match="data.n_test must be >= 1"):
        validate(cfg)
