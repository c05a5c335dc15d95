"""train/common/optim.py: schedules against hand arithmetic, guarded_step never corrupts weights."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError, ModelError, TrainingError
from posttrain.train.common.optim import (
    BadStepGuard,
    StepResult,
    build_optimizer,
    build_scheduler,
    guarded_step,
    lr_factor,
)
from posttrain.train.config.loader import OptimSection


def _lrs(schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimSection(lr=1.0, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_ratio)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_hand_arithmetic():
    # warmup 2: (0+1)/2, (1+1)/2, then the shape over the remaining 4 steps.
    assert _lrs("constant", 2, 6) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    # linear, span 4: progress 0, 1/4, 2/4, 3/4
    assert _lrs("linear", 2, 6) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    # cosine: (1 + cos(pi p)) / 2 at p = 0, 1/4, 1/2, 3/4
    c = 0.5 * (1 + math.cos(math.pi / 4))
    assert _lrs("cosine", 2, 6) == pytest.approx([0.5, 1.0, 1.0, c, 0.5, 1 - c])
    # min_lr_ratio 0.2: linear 1 - 0.8 p
    assert _lrs("linear", 0, 4, 0.2) == pytest.approx([1.0, 0.8, 0.6, 0.4])
    # past the horizon the factor stays at its floor
    assert lr_factor(
        100, warmup_steps=0, total_steps=10, schedule="cosine", min_lr_ratio=0.1
    ) == pytest.approx(0.1)


def test_scheduler_config_errors():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], OptimSection(lr=0.1))
    with pytest.raises(ConfigError, match="total optimizer steps must be positive"):
        build_scheduler(opt, OptimSection(), 0)
    with pytest.raises(ConfigError, match="optim.lr must be a positive"):
        build_optimizer([p], OptimSection(lr=0.0))
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        build_scheduler(opt, OptimSection(min_lr_ratio=2.0), 5)
    with pytest.raises(ModelError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], OptimSection())


def test_optimizer_skips_frozen_and_is_adamw():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = build_optimizer([a, b], OptimSection(lr=0.1, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["params"] == [a]
    assert opt.param_groups[0]["fused"] is False
    # First AdamW step with grad g: m/(sqrt(v)+eps) = sign(g); decay multiplies by (1 - lr*wd).
    a.grad = torch.tensor([2.0, -3.0])
    guarded_step([a], opt, None, max_grad_norm=0.0)
    expected = torch.tensor([1.0, 1.0]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0])
    assert torch.allclose(a.detach(), expected, atol=1e-6)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    cfg = OptimSection(lr=0.1, warmup_steps=0)
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg, 10)
    # one healthy step so the optimizer has moments that a bad step could corrupt
    model(torch.randn(3, 4)).pow(2).mean().backward()
    assert guarded_step(model.parameters(), opt, sched, 1.0).ok
    return model, opt, sched


@pytest.mark.parametrize("poison", ["nan_loss", "inf_grad", "nan_grad"])
def test_guarded_step_skips_non_finite_and_leaves_everything_untouched(poison):
    model, opt, sched = _model_and_opt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model.weight].items()}
    lr_before, sched_before = opt.param_groups[0]["lr"], sched.last_epoch
    loss = model(torch.randn(3, 4)).pow(2).mean()
    if poison == "nan_loss":
        loss = loss * float("nan")
    loss.backward()
    if poison == "inf_grad":
        model.weight.grad[0, 0] = float("inf")
    if poison == "nan_grad":
        model.bias.grad[1] = float("nan")
    res = guarded_step(model.parameters(), opt, sched, 1.0, loss=loss.detach())
    assert isinstance(res, StepResult) and res.ok is False
    assert not math.isfinite(res.grad_norm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt.state[model.weight].items():
        assert torch.equal(v, moments[k]), k
    assert opt.param_groups[0]["lr"] == lr_before and sched.last_epoch == sched_before
    assert all(p.grad is None for p in model.parameters())
    # and training continues normally afterwards
    model(torch.randn(3, 4)).pow(2).mean().backward()
    assert guarded_step(model.parameters(), opt, sched, 1.0).ok


def test_nan_loss_with_finite_grads_is_skipped():
    model, opt, sched = _model_and_opt()
    before = model.weight.detach().clone()
    model(torch.randn(3, 4)).pow(2).mean().backward()
    res = guarded_step(model.parameters(), opt, sched, 1.0, loss=float("nan"))
    assert not res.ok and math.isfinite(res.grad_norm)
    assert torch.equal(model.weight.detach(), before)


def test_grad_norm_is_pre_clip_and_clipping_applies():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    res = guarded_step([p], opt, None, max_grad_norm=1.0)
    assert res.ok and res.grad_norm == pytest.approx(5.0)
    # SGD step with the clipped gradient (3, 4) / 5
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]), atol=1e-5)


def test_bad_step_guard():
    guard = BadStepGuard(max_bad_steps=2)
    bad, good = StepResult(False, float("nan")), StepResult(True, 1.0)
    guard.update(bad, 1)
    guard.update(bad, 2)
    guard.update(good, 3)  # resets the streak
    guard.update(bad, 4)
    guard.update(bad, 5)
    with pytest.raises(TrainingError, match="step 6: 3 consecutive bad optimizer steps"):
        guard.update(bad, 6)
    restored = BadStepGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert restored.total == 5
