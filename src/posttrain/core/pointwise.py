"""Pointwise reward-model loss: regression of the scalar head onto given scores.

Shapes: N scored completions (one scalar prediction and one target score each).

The study guide (§2.2 "Practical Considerations", *Alternatives*) names pointwise reward
models beside Bradley–Terry: "Predict scalar scores directly (simpler but less
accurate)". Where Bradley–Terry learns only the ORDER of two completions of a prompt
(−log σ(r_w − r_l)), a pointwise model regresses the score itself:

    L = (r(x, y) − (s − b(x)))²

with s the completion's score (a rating, a verifier's partial credit, a judge's grade)
and an optional per-prompt baseline b(x). Without a baseline (b = 0) the head must also
learn how good each prompt's completions are on average, which says nothing about which
completion of the prompt is better. With b(x) = mean of the scores of x's completions in
the dataset (`prompt_baselines`), the target is the completion's score relative to its
prompt's mean — the part of the score that ranks completions of one prompt, the same
invariance (order consistency up to a per-prompt shift) that Bradley–Terry has and that
GRPO's group-mean advantage uses. A prompt with a single scored completion then has
target 0 and carries no signal.
"""

from __future__ import annotations

import torch

from posttrain.core._checks import compute_dtype, ndim, same_shape
from posttrain.core._groups import dense_groups, group_stats


def prompt_baselines(scores: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """b(x) of every completion: the mean score of the completions of the same prompt.

    scores: [N] target scores; group_id: [N] integer prompt labels (any values, any order).
    Returns [N] (a group of one gets its own score: target s − b = 0).
    """
    ndim("prompt_baselines", "scores", scores, 1)
    index, k = dense_groups("prompt_baselines", group_id, scores.shape[0])
    mean, _, _ = group_stats(scores.to(compute_dtype(scores)), index, k)
    return mean


def pointwise_loss(
    predictions: torch.Tensor, scores: torch.Tensor, baselines: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Squared error of the reward head against the (baseline-subtracted) scores.

    predictions: [N] scalar head outputs r(x, y) (with grad).
    scores: [N] target scores s; baselines: [N] per-prompt baselines b(x) or None (b = 0).
    Returns (loss [N] = (r − (s − b))², detached metrics "rm/mse" and "rm/targets", the
    mean target s − b).
    """
    same_shape("pointwise_loss", predictions=predictions, scores=scores, baselines=baselines)
    dt = compute_dtype(predictions)
    targets = scores.detach().to(dt)
    if baselines is not None:
        targets = targets - baselines.detach().to(dt)
    loss = (predictions.to(dt) - targets).pow(2)  # [N]
    with torch.no_grad():
        empty = loss.new_zeros(())
        metrics = {
            "rm/mse": loss.detach().mean() if loss.numel() else empty,
            "rm/targets": targets.mean() if loss.numel() else empty,
        }
    return loss, metrics
