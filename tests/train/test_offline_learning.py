"""Slow learning tests of the offline trainers on the tiny preset (CPU, minutes).

Run with `pytest -m slow tests/train/test_offline_learning.py`. The numbers these reach
are recorded in docs/benchmarks.md ("Offline trainers"), with the commands.
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

SORTING = ["--data.task", "sorting", "--data.difficulty", "1"]
EVAL = ["--data.n_eval", "128", "--train.eval_generations", "128", "--train.eval_temperature", "1.0",
        "--train.eval_samples", "4"]  # fmt: skip


def _sft(out, steps: int, *extra: str) -> tuple[str, dict]:
    cfg = load_config(SFTConfig, None, ["--run.output_dir", str(out), "--train.steps", str(steps),
                                        "--train.eval_every", str(steps), *EVAL, *extra])  # fmt: skip
    summary = run_sft(cfg)
    return str(out / "final"), summary["final"]


@pytest.fixture(scope="module")
def arithmetic_sft(tmp_path_factory):
    """SFT on arithmetic level 1 to its plateau (~58% greedy held-out accuracy)."""
    path, final = _sft(tmp_path_factory.mktemp("sft_arith"), 200)
    assert final["eval/accuracy"] > 0.4
    return path


@pytest.fixture(scope="module")
def sorting_sft(tmp_path_factory):
    path, final = _sft(tmp_path_factory.mktemp("sft_sort"), 100, *SORTING)
    assert final["eval/accuracy"] > 0.1
    return path


def test_reward_model_reaches_90_percent_heldout_pair_accuracy(sorting_sft, tmp_path):
    cfg = load_config(RMConfig, None, [
        "--run.output_dir", str(tmp_path / "rm"), "--model.path", sorting_sft, *SORTING, "--train.steps", "150",
        "--train.eval_every", "150", "--data.n_eval", "128", "--optim.lr", "3e-4",
    ])  # fmt: skip
    summary = run_rm(cfg)
    assert summary["initial_eval"]["eval/rm/accuracy"] < 0.6
    assert summary["final"]["eval/rm/accuracy"] >= 0.9, summary["final"]


@pytest.mark.xfail(
    strict=True,
    reason="unmet target: the tiny PRM learns only the label prior on sorting in 300 steps (docs/benchmarks.md)",
)
def test_prm_finds_the_first_wrong_step_above_chance(tmp_path):
    cfg = load_config(PRMConfig, None, [
        "--run.output_dir", str(tmp_path / "prm"), *SORTING, "--train.steps", "300", "--train.eval_every", "300",
        "--data.n_eval", "128",
    ])  # fmt: skip
    final = run_prm(cfg)["final"]
    baseline = max(final["eval/prm_first_error_chance"], final["eval/prm_first_error_majority"])
    assert final["eval/prm_first_error_acc"] >= baseline + 0.1, final
    assert os.path.isfile(os.path.join(cfg.run.output_dir, "final", "prm.json"))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_preference_optimization_raises_heldout_preference_accuracy(arithmetic_sft, tmp_path, loss):
    """Held-out preference accuracy rises; task accuracy stays at the SFT level.

    On these synthetic pairs (wrong solutions are off-policy slips) offline DPO / IPO /
    SimPO do NOT raise the task accuracy of an SFT model that has plateaued (measured:
    docs/benchmarks.md); the test pins that they do not damage it either.
    """
    cfg = load_config(DPOConfig, None, [
        "--run.output_dir", str(tmp_path / loss), "--model.path", arithmetic_sft, "--algo.loss", loss,
        "--ref.cache_dir", str(tmp_path / "cache"), "--train.steps", "60", "--train.eval_every", "60",
        "--optim.lr", "1e-5", *EVAL,
    ])  # fmt: skip
    summary = run_dpo(cfg)
    before, after = summary["initial_eval"], summary["final"]
    assert after["eval/pref/accuracy"] > before["eval/pref/accuracy"], (before, after)
    assert after["eval/pref/accuracy"] >= 0.8, after
    assert after["eval/accuracy_sampled"] >= before["eval/accuracy_sampled"] - 0.03, (before, after)
