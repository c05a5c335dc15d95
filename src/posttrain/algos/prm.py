"""Process reward model: a scalar head scoring each reasoning step.

Shapes: B traces, S steps (padded), L sequence length, T completion tokens.

A stepwise trace is a prompt and a list of step strings with one correctness label per
step (TRL-style `completions` / `labels`; the synthetic tasks' `steps` / `step_labels`).
The completion the PRM reads is every step followed by a step separator:

    step_1 SEP step_2 SEP ... step_S SEP

and the head's logit at each SEP token (the token that ends a step, so it has seen the
whole prefix y_≤t) is trained with binary cross-entropy against that step's label
(Lightman et al. 2023, "Let's Verify Step by Step": per-step correctness classification;
Math-Shepherd, Wang et al. 2024, uses the same placement). σ(logit) = PRM(x, y_≤t), the
probability the reasoning is still correct after step t. Its marginals
r_t = PRM(≤t) − PRM(≤t−1) are the dense rewards of `core.advantages.prm_token_rewards`
(seed: grpo-kl-estimators-distillation-prm-longcot.md, "PRM reward for RL").

The layout, the head read-out, `score_steps` and `load_prm` live in
`posttrain.engines.scoring` (the "prm" reward in data/ needs them and must not import
algos/); they are re-exported here so trainers and users keep one import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from posttrain.core.masking import aggregate
from posttrain.engines.scoring import (
    STEP_SEPARATOR,
    StepBatch,
    build_step_batch,
    load_prm,
    score_steps,
    step_logits,
)

__all__ = [
    "STEP_SEPARATOR",
    "StepBatch",
    "build_step_batch",
    "first_wrong_step",
    "largest_drop_step",
    "load_prm",
    "prm_loss",
    "score_steps",
    "step_logits",
]


def prm_loss(
    value_model: torch.nn.Module,
    batch: StepBatch,
    *,
    num_steps: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-level binary cross-entropy, averaged over every labelled step of the step.

    num_steps: GLOBAL number of labelled steps in the optimizer step (all micro-batches),
        so micro-batch losses sum to the full-batch mean (accumulation invariance).

    Returns (scalar loss, detached sums: "prm/bce_sum", "prm/steps", "prm/correct" (steps
    whose σ(logit) > 0.5 agrees with the label)).
    """
    logits = step_logits(value_model, batch)  # [B, S]
    bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")  # [B, S]
    loss = aggregate(bce, batch.step_mask, "token-mean", num_tokens=num_steps)
    pred = (logits.detach() > 0).float()
    metrics = {
        "prm/bce_sum": (bce.detach() * batch.step_mask).sum(),
        "prm/steps": batch.step_mask.sum(),
        "prm/correct": ((pred == batch.labels).float() * batch.step_mask).sum(),
    }
    return loss, metrics


def first_wrong_step(step_scores: Sequence[float], threshold: float = 0.5) -> int | None:
    """Index of the first step whose score is below `threshold`, or None if none is.

    step_scores: per-step PRM(≤t) probabilities of one trace.
    threshold: decision boundary on σ(logit); 0.5 is the BCE-calibrated choice.
    """
    for i, score in enumerate(step_scores):
        if score < threshold:
            return i
    return None


def largest_drop_step(step_scores: Sequence[float], initial: float = 1.0) -> int | None:
    """Index of the step whose score fell most: argmax_t PRM(≤t−1) − PRM(≤t), or None if empty.

    step_scores: per-step PRM(≤t) probabilities of one trace.
    initial: PRM(≤0), the score before any step; 1.0 because an empty prefix cannot be wrong.
    This localises the error of a trace known to contain one: the step with the most
    negative marginal r_t = PRM(≤t) − PRM(≤t−1) (the dense reward of
    `core.advantages.prm_token_rewards`). Unlike `first_wrong_step` it needs no threshold,
    so it does not depend on how the PRM's scores are calibrated around 0.5. Ties go to the
    earlier step.
    """
    best, best_drop, prev = None, float("-inf"), initial
    for i, score in enumerate(step_scores):
        if prev - score > best_drop:
            best, best_drop = i, prev - score
        prev = score
    return best
