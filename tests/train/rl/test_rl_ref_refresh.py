"""Periodic reference refresh (algo.ref_refresh_every): π_ref <- π_θ every N steps.

The KL metrics restart from 0 on the step after a refresh and grow again until the next;
a run resumed from a checkpoint taken between refreshes continues bit for bit (the
refreshed reference is saved with the checkpoint); settings that cannot work are errors.
"""

from __future__ import annotations

import pytest
import torch

from posttrain import cli
from posttrain.errors import ConfigError
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config

KL = ("kl/k1", "kl/k2", "kl/k3")


def _steps(trainer: RLTrainer, n: int) -> list[dict]:
    return [trainer.step() for _ in range(n)]


@pytest.mark.parametrize(
    "method, extra", [("grpo", ("algo.kl_coef=0.05",)), ("ppo", ("algo.kl_coef=0.05", "optim.lr=1e-3"))]
)
def test_kl_restarts_from_zero_after_each_refresh(tmp_path, method, extra):
    """KL in the loss (GRPO, k3) and in the reward (PPO, k1): every 2 steps the reference
    becomes the policy, so steps 2 and 4 see KL exactly 0 where the plain run's KL grows."""
    refreshed = RLTrainer(tiny_config(tmp_path / "r", method, *extra, "algo.ref_refresh_every=2", steps=5))
    plain = RLTrainer(tiny_config(tmp_path / "p", method, *extra, steps=5))
    rows, base = _steps(refreshed, 5), _steps(plain, 5)
    assert [r["kl/ref_refreshed"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 0.0]
    for step in (2, 4):
        assert all(rows[step][k] == pytest.approx(0.0, abs=1e-7) for k in KL), rows[step]
        assert all(base[step][k] > 1e-4 for k in KL), base[step]
    for step in (1, 3):  # the drift since the last refresh is measured again
        assert rows[step]["kl/k3"] > 1e-4
    # Steps 0-1 are identical: the refresh happens after step 1's update.
    assert rows[1]["kl/k3"] == base[1]["kl/k3"]
    for a, b in zip(refreshed.reference.model.parameters(), refreshed.policy.model.parameters()):
        assert not torch.equal(a, b)  # step 4 updated the policy after the last refresh
    if method == "grpo":
        assert rows[2]["kl/loss"] == pytest.approx(0.0, abs=1e-7) and base[2]["kl/loss"] > 1e-4


def test_resume_between_refreshes_is_exact(tmp_path):
    """4 uninterrupted steps == 3 steps, checkpoint, resume for the 4th: the checkpoint
    carries the reference refreshed after step 2, which step 4's KL reads."""
    extra = ("algo.kl_coef=0.05", "algo.ref_refresh_every=2")
    whole = RLTrainer(tiny_config(tmp_path / "whole", "grpo", *extra, steps=4))
    rows = _steps(whole, 4)
    first = RLTrainer(tiny_config(tmp_path / "cut", "grpo", *extra, steps=4))
    _steps(first, 3)
    path = first.save_checkpoint()
    resumed = RLTrainer(tiny_config(tmp_path / "cut", "grpo", *extra, steps=4))
    resumed.load_checkpoint(path)
    last = resumed.step()
    for key in (*KL, "kl/loss", "loss/total", "train/grad_norm"):
        assert last[key] == rows[3][key], key
    for a, b in zip(whole.policy.model.parameters(), resumed.policy.model.parameters()):
        assert torch.equal(a, b)
    # Without the saved reference (the initial policy instead) step 4's KL would differ.
    stale = RLTrainer(tiny_config(tmp_path / "cut", "grpo", *extra, steps=4))
    stale.load_checkpoint(path)
    stale.reference = RLTrainer(tiny_config(tmp_path / "fresh", "grpo", *extra, steps=4)).reference
    assert stale.step()["kl/k3"] != rows[3]["kl/k3"]


def test_settings_that_cannot_refresh_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="has none"):
        RLTrainer(tiny_config(tmp_path, "grpo", "algo.kl_coef=0", "algo.ref_refresh_every=2"))
    with pytest.raises(ConfigError, match="LoRA"):
        RLTrainer(
            tiny_config(tmp_path, "grpo", "algo.kl_coef=0.05", "algo.ref_refresh_every=2", "model.lora_r=4")
        )
    with pytest.raises(ConfigError, match=">= 0"):
        RLTrainer(tiny_config(tmp_path, "grpo", "algo.kl_coef=0.05", "algo.ref_refresh_every=-1"))


def test_dry_run_names_the_refresh(capsys):
    assert cli.main(["rl", "--algo.kl_coef", "0.05", "--algo.ref_refresh_every", "50", "--dry-run"]) == 0
    assert "reference (reset to the policy every 50 steps)" in capsys.readouterr().out
