"""Pointwise reward-model loss (study guide §2.2) against hand arithmetic."""

import pytest
import torch

from posttrain.core.pointwise import pointwise_loss, prompt_baselines
from posttrain.errors import DataError


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_squared_error_without_baseline_by_hand():
    # (0.5 - 1)^2 = 0.25, (-1 - 0)^2 = 1, (2 - 2)^2 = 0
    loss, m = pointwise_loss(_t(0.5, -1.0, 2.0), _t(1.0, 0.0, 2.0))
    assert loss.tolist() == pytest.approx([0.25, 1.0, 0.0])
    assert m["rm/mse"].item() == pytest.approx(1.25 / 3)
    assert m["rm/targets"].item() == pytest.approx(1.0)


def test_prompt_baseline_is_the_prompt_mean_score_by_hand():
    # prompt 7: scores 1, 3, 8 -> mean 4; prompt 2: scores 0, 1 -> mean 0.5; prompt 5 alone: its own 6
    scores = _t(1.0, 0.0, 3.0, 1.0, 8.0, 6.0)
    group = torch.tensor([7, 2, 7, 2, 7, 5])
    base = prompt_baselines(scores, group)
    assert base.tolist() == pytest.approx([4.0, 0.5, 4.0, 0.5, 4.0, 6.0])
    # targets s - b: -3, -0.5, -1, 0.5, 4, 0; predictions 0 -> loss = target^2
    loss, m = pointwise_loss(torch.zeros(6, dtype=torch.float64), scores, base)
    assert loss.tolist() == pytest.approx([9.0, 0.25, 1.0, 0.25, 16.0, 0.0])
    assert m["rm/targets"].item() == pytest.approx(0.0)


def test_gradient_is_twice_the_residual():
    pred = _t(1.0, -2.0).requires_grad_()
    loss, _ = pointwise_loss(pred, _t(0.0, 1.0), _t(0.5, 0.5))
    loss.sum().backward()
    # residuals r - (s - b): 1 - (-0.5) = 1.5 ; -2 - 0.5 = -2.5
    assert pred.grad.tolist() == pytest.approx([3.0, -5.0])


def test_shape_errors_name_the_argument():
    with pytest.raises(DataError, match="scores"):
        pointwise_loss(_t(1.0, 2.0), _t(1.0))
    with pytest.raises(DataError, match="group_id"):
        prompt_baselines(_t(1.0, 2.0), torch.tensor([0]))
