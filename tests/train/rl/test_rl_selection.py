"""Success-rate sampling fed by one reward, and the Kimi/Qwen3 difficulty filter."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError
from posttrain.train.config.rl import validate
from posttrain.train.rl.controller import RLTrainer
from rl_common import DIGIT_REWARD, tiny_config

TWO_REWARDS = f"rewards=[{{name: {DIGIT_REWARD}, weight: 1.0}}, {{name: format, weight: 2.0}}]"


def test_success_reward_feeds_only_that_reward_to_the_sampler(tmp_path, monkeypatch):
    cfg = tiny_config(
        tmp_path, "grpo", "data.selection=success_rate", f"data.success_reward={DIGIT_REWARD}", TWO_REWARDS
    )
    trainer = RLTrainer(cfg)
    seen: list[float] = []
    real = trainer.prompts._sampler.update
    monkeypatch.setattr(trainer.prompts._sampler, "update", lambda ids, s: (seen.extend(s), real(ids, s))[1])
    trainer.step()
    assert seen and all(0.0 <= s <= 1.0 for s in seen)
    batch = trainer._last_batch
    digit = [sum(c.isdigit() for c in t) / max(1, len(t)) for t in batch.texts]
    assert seen == pytest.approx(digit, abs=1e-6)  # the digit reward alone, not digit + 2 * format


def test_summed_scores_are_clipped_without_a_success_reward(tmp_path):
    trainer = RLTrainer(tiny_config(tmp_path, "grpo", "data.selection=success_rate", TWO_REWARDS))
    trainer.step()  # format weight 2 can push the sum past 1: must not crash the sampler


def test_unknown_reward_names_fail_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"rewards\[0\].name: unknown reward 'acuracy'.*accuracy"):
        validate(tiny_config(tmp_path, "grpo", "rewards=[{name: acuracy}]"))
    with pytest.raises(ConfigError, match="data.success_reward 'accuracy' is not one of"):
        validate(tiny_config(tmp_path, "grpo", "data.success_reward=accuracy"))
    with pytest.raises(ConfigError, match="difficulty_filter"):
        validate(
            tiny_config(tmp_path, "grpo", "data.difficulty_filter_k=4", "data.difficulty_filter_max_solved=4")
        )


def test_difficulty_filter_keeps_rarely_solved_prompts_and_is_reused_on_resume(tmp_path):
    # Success = at least half the characters are digits; a random tiny model rarely manages it
    # at k=4, so "max 0 solved" keeps most prompts but not necessarily all.
    extra = ("data.difficulty_filter_k=4", "data.difficulty_filter_max_solved=0", "data.n_train=16")
    trainer = RLTrainer(tiny_config(tmp_path, "grpo", *extra))
    assert not (tmp_path / "difficulty_filter.json").exists()  # nothing written before training starts
    trainer.train()
    record = json.loads((tmp_path / "difficulty_filter.json").read_text())
    counts = record["counts"]
    assert len(counts) == 16 and all(0 <= c <= 4 for c in counts.values())
    kept = {it.id for it in trainer.prompts.items}
    assert kept == set(record["kept"]) == {pid for pid, c in counts.items() if c == 0}
    # A resumed run reads the kept ids back rather than filtering again with a newer policy.
    record["kept"] = sorted(kept)[:3]
    (tmp_path / "difficulty_filter.json").write_text(json.dumps(record))
    resumed = RLTrainer(tiny_config(tmp_path, "grpo", *extra, "run.resume=true"))
    assert {it.id for it in resumed.prompts.items} == set(sorted(kept)[:3])
