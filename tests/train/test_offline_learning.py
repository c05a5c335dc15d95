"""Slow learning tests of the offline trainers from a briefly SFT'd tiny model.

Run with `pytest -m slow tests/train/test_offline_learning.py`. The numbers these
reach are recorded in docs/benchmarks.md ("Offline trainers").
"""

from __future__ import annotations

import os

import pytest

from posttrain.train.config import load_config
from posttrain.train.offline import (
    DPOConfig,
    PRMConfig,
    RMConfig,
    SFTConfig,
    run_dpo,
    run_prm,
    run_rm,
    run_sft,
)

pytestmark = pytest.mark.slow

EVAL = ["--data.n_eval", "128", "--train.eval_generations", "128", "--train.eval_temperature", "1.0",
        "--train.eval_samples", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """The SFT start every other trainer begins from (~58% greedy held-out accuracy)."""
    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(
        SFTConfig,
        None,
        ["--run.output_dir", str(out), "--train.steps", "200", "--train.eval_every", "200", *EVAL],
    )
    summary = run_sft(cfg)
    assert summary["final"]["eval/accuracy"] > 0.4
    return str(out / "final"), summary["final"]


def test_reward_model_reaches_90_percent_heldout_pair_accuracy(sft_dir, tmp_path):
    path, _ = sft_dir
    cfg = load_config(RMConfig, None, [
        "--run.output_dir", str(tmp_path / "rm"), "--model.path", path, "--train.steps", "150",
        "--train.eval_every", "150", "--data.n_eval", "128", "--optim.lr", "3e-4",
    ])  # fmt: skip
    summary = run_rm(cfg)
    assert summary["initial_eval"]["eval/rm/accuracy"] < 0.7
    assert summary["final"]["eval/rm/accuracy"] >= 0.9, summary["final"]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_preference_optimization_beats_the_sft_start(sft_dir, tmp_path, loss):
    path, _ = sft_dir
    cfg = load_config(DPOConfig, None, [
        "--run.output_dir", str(tmp_path / loss), "--model.path", path, "--algo.loss", loss,
        "--ref.cache_dir", str(tmp_path / "cache"), "--train.steps", "60", "--train.eval_every", "60",
        "--optim.lr", "1e-5", *EVAL,
    ])  # fmt: skip
    summary = run_dpo(cfg)
    before, after = summary["initial_eval"], summary["final"]
    assert after["eval/pref/accuracy"] >= before["eval/pref/accuracy"] + 0.2, (before, after)
    # the policy's held-out task accuracy (mean over 4 samples at T=1 per prompt) rises
    assert after["eval/accuracy_sampled"] > before["eval/accuracy_sampled"], (before, after)


def test_prm_finds_the_first_wrong_step_above_chance(sft_dir, tmp_path):
    path, _ = sft_dir
    cfg = load_config(PRMConfig, None, [
        "--run.output_dir", str(tmp_path / "prm"), "--model.path", path, "--train.steps", "300",
        "--train.eval_every", "300", "--data.n_eval", "128",
    ])  # fmt: skip
    final = run_prm(cfg)["final"]
    assert final["eval/prm_first_error_acc"] >= final["eval/prm_first_error_chance"] + 0.15, final
    assert os.path.isfile(os.path.join(cfg.run.output_dir, "final", "prm.json"))
