"""KL in the reward uses the configured estimator (issue #16, item 3)."""

from __future__ import annotations

import pytest
import torch

from posttrain.core.kl import KL_ESTIMATORS
from posttrain.errors import ConfigError
from posttrain.train.config.rl import validate
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_reward_penalises_with_the_chosen_estimator(estimator, tmp_path, monkeypatch):
    import posttrain.train.rl.controller as rl

    cfg = tiny_config(
        tmp_path,
        "reinforce_pp",
        "algo.kl_placement=reward",
        f"algo.kl_estimator={estimator}",
        "algo.kl_coef=0.5",
    )
    trainer = RLTrainer(cfg)
    with torch.no_grad():  # a reference that differs from the policy, so every estimator is non-zero
        for q in trainer.reference.model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    seen = {}
    real = rl.estimate_advantages

    def spy(spec, **kwargs):
        seen["token_rewards"] = kwargs["token_rewards"]
        return real(spec, **kwargs)

    monkeypatch.setattr(rl, "estimate_advantages", spy)
    trainer.step()
    b = trainer._last_batch
    want = -0.5 * KL_ESTIMATORS[estimator](b.old_logprobs, b.ref_logprobs) * b.mask
    assert want.abs().sum() > 0
    assert torch.allclose(seen["token_rewards"], want, atol=1e-6)


def test_loss_side_estimator_in_the_reward_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "reinforce_pp", "algo.kl_placement=reward", "algo.kl_estimator=k3_is")
    with pytest.raises(ConfigError, match="algo.kl_estimator 'k3_is'"):
        validate(cfg)
