"""TRPO in the RL loop (algo.method trpo / algo.trust_region δ): the accepted step's KL is
at most δ (measured independently), a step the line search cannot accept leaves the
weights untouched, and settings TRPO would ignore are errors. Learning beside PPO on the
digit task: tests/train/rl/test_rl_learning.py (slow)."""

from __future__ import annotations

import copy

import pytest
import torch

import posttrain.train.rl.trpo as trpo_mod
from posttrain.core.kl import exact_kl_from_logits
from posttrain.engines.logprobs import response_logits
from posttrain.errors import ConfigError
from posttrain.train.rl.controller import RLTrainer, plan
from rl_common import tiny_config

DELTA = 0.05


def test_accepted_steps_stay_inside_the_trust_region(tmp_path):
    trainer = RLTrainer(
        tiny_config(tmp_path, "trpo", f"algo.trust_region={DELTA}", "algo.cg_damping=0.01", steps=2)
    )
    for _ in range(2):
        before = copy.deepcopy(trainer.policy.model)
        m = trainer.step()
        assert m["trpo/accepted"] == 1.0 and 0.0 < m["trpo/kl"] <= DELTA, m
        assert m["trpo/improve"] > 0 and m["trpo/expected_improve"] > 0
        # the KL the line search measured, recomputed from the two models on the same batch
        seq, mask = trainer._last_batch.seq, trainer._last_batch.mask
        with torch.no_grad():
            kl = exact_kl_from_logits(
                response_logits(before, seq).float(), response_logits(trainer.policy.model, seq).float()
            )
        assert ((kl * mask).sum() / mask.sum()).item() == pytest.approx(m["trpo/kl"], rel=1e-3)
        assert any(
            not torch.equal(a, b) for a, b in zip(before.parameters(), trainer.policy.model.parameters())
        )
    assert "value/loss" in m  # the critic took its own optimizer step


def test_a_step_the_line_search_rejects_leaves_the_policy_unchanged(tmp_path, monkeypatch):
    real = trpo_mod.trust_region_step
    monkeypatch.setattr(trpo_mod, "trust_region_step", lambda *a: 1e3 * real(*a))  # far outside δ
    trainer = RLTrainer(tiny_config(tmp_path, "trpo", "algo.backtrack_steps=2", steps=1))
    before = [p.detach().clone() for p in trainer.policy.model.parameters()]
    m = trainer.step()
    assert m["trpo/accepted"] == 0.0 and m["trpo/backtracks"] == 2.0
    assert m["train/skipped_total"] == 0  # a rejected line search is TRPO working, not a bad step
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.model.parameters()))


@pytest.mark.parametrize(
    "extra, match",
    [
        (("algo.update_epochs=2",), "one step per batch"),
        (("algo.policy_loss=ppo",), "algo.policy_loss"),
        (("algo.entropy_coef=0.01",), "algo.entropy_coef"),
        (("algo.kl_placement=loss", "algo.kl_coef=0.1"), "kl_placement loss"),
        (("algo.trust_region=0",), "must be > 0"),
    ],
)
def test_settings_trpo_would_ignore_are_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        plan(tiny_config(tmp_path, "trpo", *extra))


def test_plan_names_the_trust_region(tmp_path):
    text = plan(tiny_config(tmp_path, "trpo"))
    assert "trust_region: 0.01" in text and "cg_iters: 10" in text
