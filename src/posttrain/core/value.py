"""Critic loss and diagnostics. Shapes: values, old_values, returns, mask [B, T]."""

from __future__ import annotations

import torch

from posttrain.core._checks import compute_dtype, positive, same_shape
from posttrain.core.masking import masked_var


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
) -> torch.Tensor:
    """Per-token critic loss ½(V − R)², optionally clipped as in PPO's reference code
    (OpenAI baselines ppo2; not in the PPO paper):

        ½ · max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)

    The max is the pessimistic choice, so the critic cannot reduce its loss by jumping
    more than c away from the values that produced the advantages.
    Args: values [B, T] (differentiable), old_values [B, T], returns [B, T] (targets,
    detached), mask [B, T]; clip_range c > 0 or None (unclipped).
    Returns: [B, T] loss, 0 where mask is 0; reduce with aggregate().
    """
    same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    dt = compute_dtype(values)
    v, r, m = values.to(dt), returns.detach().to(dt), mask.to(dt)
    loss = (v - r).pow(2)
    if clip_range is not None:
        positive("value_loss", "clip_range", clip_range)
        old = old_values.detach().to(dt)
        v_clip = old + (v - old).clamp(-clip_range, clip_range)
        loss = torch.maximum(loss, (v_clip - r).pow(2))
    return 0.5 * loss * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over masked tokens: 1 = perfect critic, 0 = no better than
    a constant, < 0 = worse. Defined as 0 when Var[R] = 0 (nothing to explain).
    Returns: scalar tensor (detached)."""
    same_shape("explained_variance", values=values, returns=returns, mask=mask)
    dt = compute_dtype(values)
    v, r, m = values.detach().to(dt), returns.detach().to(dt), mask.to(dt)
    var_r = masked_var(r, m)
    ev = 1.0 - masked_var(r - v, m) / torch.where(var_r > 0, var_r, torch.ones_like(var_r))
    return torch.where(var_r > 0, ev, torch.zeros_like(ev))
