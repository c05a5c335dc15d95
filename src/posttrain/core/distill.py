"""Distillation pieces: on-policy reverse KL, full-vocabulary divergences, KDRL helpers.

Shapes: B sequences, T tokens, V vocabulary. "Student" is the policy being trained.
"""

from __future__ import annotations

import math

import torch

from posttrain.core._checks import choice, compute_dtype, ndim, same_shape
from posttrain.core.kl import exact_kl_from_logits
from posttrain.errors import ConfigError


def reverse_kl_tokens(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token sampled reverse KL, log π_student(y_t) − log π_teacher(y_t), for tokens
    sampled from the student (on-policy distillation; Agarwal et al. 2024 GKD, Thinking
    Machines 2025 "On-Policy Distillation"): an unbiased single-sample (k1) estimate of
    KL(π_student || π_teacher) at each visited state. Used as a negative token reward
    (−coef · this) or, with grad, as a loss. Args: [B, T] each. Returns [B, T].
    """
    same_shape("reverse_kl_tokens", logprobs=logprobs, teacher_logprobs=teacher_logprobs)
    dt = compute_dtype(logprobs)
    return logprobs.to(dt) - teacher_logprobs.detach().to(dt)


def forward_kl_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Exact forward KL(p_teacher || p_student) per position (mode-covering; classic KD,
    Hinton et al. 2015 without the τ² factor). Args: [B, T, V] each. Returns [B, T]."""
    return exact_kl_from_logits(teacher_logits.detach(), student_logits, temperature)


def reverse_kl_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Exact reverse KL(p_student || p_teacher) per position (mode-seeking; the quantity
    on-policy distillation estimates by sampling). Args: [B, T, V] each. Returns [B, T]."""
    return exact_kl_from_logits(student_logits, teacher_logits.detach(), temperature)


def generalized_jsd_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024, eq. 2):

        JSD(β) = β·KL(p_T || M) + (1−β)·KL(p_S || M),   M = β·p_T + (1−β)·p_S,   0 < β < 1

    β = 0.5 is the symmetric JSD (bounded by log 2). JSD(β)/β → forward KL as β → 0 and
    JSD(β)/(1−β) → reverse KL as β → 1; use the dedicated KL functions for the endpoints.
    Computed in log space (log M by logsumexp) so it stays finite for peaked softmaxes.
    Args: student_logits, teacher_logits [B, T, V]; beta; temperature τ > 0.
    Returns: [B, T], differentiable w.r.t. the student.
    """
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"generalized_jsd_from_logits: beta must be in (0, 1), got {beta!r}")
    same_shape("generalized_jsd_from_logits", student_logits=student_logits, teacher_logits=teacher_logits)
    ndim("generalized_jsd_from_logits", "student_logits", student_logits, (2, 3))
    dt = compute_dtype(student_logits)
    logp_s = torch.log_softmax(student_logits.to(dt) / temperature, -1)
    logp_t = torch.log_softmax(teacher_logits.detach().to(dt) / temperature, -1)
    log_m = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log(1.0 - beta)]), dim=0)
    kl_t = (logp_t.exp() * (logp_t - log_m)).sum(-1)
    kl_s = (logp_s.exp() * (logp_s - log_m)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def kdrl_kd_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """KDRL reward-guided masking (Xu et al. 2025, "KDRL"): apply the KD term only to
    samples whose reward is strictly below `threshold` (e.g. 1.0 with 0/1 rewards = only
    the wrong answers), leaving solved samples to the RL term.
    Args: scores [B]. Returns: keep [B] bool (True = apply KD)."""
    ndim("kdrl_kd_mask", "scores", scores, 1)
    return scores.detach() < threshold


def anneal(step: int, start: float, end: float, total_steps: int, kind: str = "linear") -> float:
    """Coefficient schedule from `start` (step 0) to `end` (step >= total_steps), e.g.
    KDRL's KD coefficient β moving from strong imitation to reward-driven learning.
    kind: "linear", or "cosine" (half-cosine, flat at both ends). total_steps <= 0 means
    "already finished" (returns end). Pure Python floats: called once per step by train/."""
    choice("anneal", "kind", kind, ("linear", "cosine"))
    if total_steps <= 0:
        return float(end)
    frac = min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        return float(start + (end - start) * frac)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac)))
