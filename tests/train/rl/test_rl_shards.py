"""Sampling in prompt shards (train/rl/shards.py) and the update loop's rank shares and
metrics (roles/updates.py), in one process; the multi-process runs are
tests/distributed/test_rl_dp.py."""

from __future__ import annotations

import pytest
import torch

from posttrain.roles.updates import _my_micro_batches
from posttrain.train.rl.controller import RLTrainer
from posttrain.train.rl.shards import shard_bounds
from rl_common import tiny_config


def test_shard_bounds_are_contiguous_and_balanced():
    assert shard_bounds(4, 2) == [(0, 2), (2, 4)]
    assert shard_bounds(3, 2) == [(0, 2), (2, 3)]
    assert shard_bounds(1, 2) == [(0, 1), (1, 1)]  # a refill round of one prompt: rank 1 idles


def test_each_rank_runs_as_many_micro_batches_as_the_largest_share():
    assert [x.tolist() for x in _my_micro_batches(5, None, 1, 0)] == [[0, 1, 2, 3, 4]]
    r0, r1 = _my_micro_batches(5, 2, 2, 0), _my_micro_batches(5, 2, 2, 1)
    assert [x.tolist() for x in r0] == [[0, 1], [2]]
    assert [x.tolist() for x in r1[:1]] == [[3, 4]] and r1[1] is None  # a zero-weight pass
    assert _my_micro_batches(1, None, 2, 1) == [None]


def test_update_metrics_do_not_depend_on_the_micro_batch_size(tmp_path):
    """Loss terms are partial sums over the minibatch's counts (summed over micro-batches);
    the others are token-weighted: 1 x 8 and 8 x 1 micro-batches log the same numbers."""
    out = []
    for micro in (0, 1):
        cfg = tiny_config(tmp_path / f"m{micro}", "grpo", "rollout.prompts_per_step=2", "algo.kl_coef=0.1",
                          f"algo.micro_batch_size={micro}")  # fmt: skip
        out.append(RLTrainer(cfg).step())
    for key in ("policy/loss", "kl/loss", "loss/total", "policy/ratio_mean"):
        assert out[1][key] == pytest.approx(out[0][key], rel=1e-4, abs=1e-7), key


def test_one_process_samples_in_the_shards_it_is_given(tmp_path):
    one = RLTrainer(tiny_config(tmp_path / "a", "grpo")).step()
    same = RLTrainer(tiny_config(tmp_path / "b", "grpo", "rollout.shards=1")).step()
    two = RLTrainer(tiny_config(tmp_path / "c", "grpo", "rollout.shards=2")).step()
    assert same["reward/mean"] == one["reward/mean"]  # shards=0 in one process is one shard
    assert two["rollout/batch_size"] == one["rollout/batch_size"] == 16
    assert torch.isfinite(torch.tensor(two["loss/total"]))
