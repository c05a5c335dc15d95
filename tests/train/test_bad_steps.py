"""One bad-step guard with one meaning in every command, exploding updates rolled back, and
absurd optimizer settings refused at config time (issue #22)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.common.optim import BadStepGuard, StepResult, build_scheduler, guarded_step, update_ratio
from posttrain.train.config.loader import OptimSection, load_config
from posttrain.train.offline.commands import SFTConfig, run_sft
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("lr", [1e30, 1e38])
def test_exploding_update_is_rolled_back_bit_identically(lr):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_scheduler(opt, OptimSection(lr=1e-2), 10)
    model(torch.randn(2, 4)).square().sum().backward()
    assert guarded_step(model.parameters(), opt, sched, 1.0, max_update_ratio=1.0).ok  # a normal step
    before, last_lr = _state(model, opt), sched.get_last_lr()
    for group in opt.param_groups:
        group["lr"] = lr  # far too high: weights ~lr (1e38 overflows float32 to inf)
    model(torch.randn(2, 4)).square().sum().backward()
    res = guarded_step(model.parameters(), opt, sched, 1.0, max_update_ratio=1.0)
    assert not res.ok and res.rolled_back and not res.update_ratio <= 1.0
    after = _state(model, opt)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert sched.get_last_lr() == last_lr  # the scheduler did not advance
    assert all(p.grad is None for p in model.parameters())


def test_update_ratio_floor_and_disabled_check():
    w = [torch.zeros(3)]
    assert update_ratio([torch.full((3,), 0.5)], w) == pytest.approx(math.sqrt(0.75))  # floor 1
    assert update_ratio([torch.tensor([2.0, 0, 0])], [torch.tensor([1.0, 0, 0])]) == pytest.approx(1.0)
    assert math.isnan(update_ratio([torch.tensor([math.nan])], [torch.tensor([1.0])]))
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1e6)
    p.grad = torch.ones(2)
    res = guarded_step([p], opt, None, 0.0, max_update_ratio=0.0)  # 0: no check, no copy
    assert res.ok and not res.rolled_back and float(p.detach()[0]) == pytest.approx(1 - 1e6)


def test_guard_n_tolerates_n_and_stops_at_n_plus_1():
    bad = StepResult(False, math.nan)
    guard = BadStepGuard(0)
    with pytest.raises(TrainingError, match="step 1: 1 consecutive bad .* run.max_bad_steps=0"):
        guard.update(bad, 1)
    guard = BadStepGuard(2)
    guard.update(bad, 1)
    guard.update(bad, 2)
    with pytest.raises(TrainingError, match="3 consecutive"):
        guard.update(StepResult(False, 1.0, rolled_back=True, update_ratio=50.0), 3)
    with pytest.raises(ConfigError, match="run.max_bad_steps"):
        BadStepGuard(-1)


@pytest.mark.parametrize("lr", ["1e39", "inf", "nan", "-1", "0", "1.5"])
def test_absurd_lr_is_a_config_error(lr):
    with pytest.raises(
        ConfigError, match=r"optim\.lr(': expected a number, got NaN| must be a (positive )?finite number)"
    ):
        load_config(SFTConfig, None, ["--optim.lr", lr])


@pytest.mark.parametrize(
    "key, value",
    [("optim.eps", "0"), ("optim.weight_decay", "nan"), ("optim.max_grad_norm", "inf"),
     ("optim.max_update_ratio", "-1"), ("optim.betas", "[0.9, 1.0]"), ("run.max_bad_steps", "-1")],
)  # fmt: skip
def test_other_absurd_values_name_their_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SFTConfig, None, [f"--{key}", value])


def _sft(tmp_path: Path, *extra: str) -> SFTConfig:
    return load_config(
        SFTConfig, None,
        ["--run.output_dir", str(tmp_path), "--data.n_train", "16", "--data.n_eval", "4",
         "--train.eval_generations", "0", "--train.eval_every", "0", "--train.eval_at_start", "false",
         "--train.steps", "4", "--train.batch_size", "4", *extra],
    )  # fmt: skip


def test_sft_and_rl_stop_at_the_same_bad_step_and_never_keep_exploded_weights(tmp_path):
    # lr 1.0 is accepted by the config, but every AdamW update is ~50x the weights' norm.
    with pytest.raises(TrainingError, match="step 2: 2 consecutive bad .*rolled back.*max_bad_steps=1"):
        run_sft(_sft(tmp_path / "sft", "--optim.lr", "1.0", "--run.max_bad_steps", "1"))
    assert not (tmp_path / "sft" / "checkpoints").exists() and not (tmp_path / "sft" / "final").exists()
    trainer = RLTrainer(tiny_config(tmp_path / "rl", "grpo", "optim.lr=1.0", "run.max_bad_steps=1", steps=3))
    before = [p.detach().clone() for p in trainer.policy.model.parameters()]
    m = trainer.step()
    assert m["train/rolled_back_updates"] == 1 and m["train/updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.model.parameters()))
    with pytest.raises(TrainingError, match="2 consecutive bad .*rolled back.*max_bad_steps=1"):
        trainer.step()


def test_sft_default_lr_is_never_rolled_back(tmp_path):
    summary = run_sft(_sft(tmp_path, "--optim.lr", "1e-3", "--run.max_bad_steps", "0"))
    assert summary["skipped_steps"] == 0


OPTIMIZER_KEYS = {
    "train/lr",
    "train/grad_norm",
    "train/updates",
    "train/skipped_updates",
    "train/rolled_back_updates",
    "train/skipped_total",
}


def test_sft_and_rl_log_the_same_optimizer_keys(tmp_path):
    """One metric namespace (issue #17): the offline loop logs the RL controller's train/* keys."""
    from posttrain.train.common.metrics import METRICS_FILE, read_jsonl

    run_sft(_sft(tmp_path / "sft", "--optim.lr", "1e-3"))
    rows = [r for r in read_jsonl(tmp_path / "sft" / METRICS_FILE) if "train/loss" in r]
    rl_row = RLTrainer(tiny_config(tmp_path / "rl", "grpo", steps=1)).step()
    assert rows and all(OPTIMIZER_KEYS <= r.keys() for r in rows)
    assert OPTIMIZER_KEYS <= rl_row.keys()
    assert not any(k.startswith("optim/") for r in rows for k in r)
    assert [r["train/updates"] for r in rows] == [1] * len(rows) and rows[-1]["train/skipped_total"] == 0
