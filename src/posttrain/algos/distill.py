"""Teacher signals for the RL loop: on-policy distillation and KDRL.

On-policy distillation (Agarwal et al. 2024, GKD; Thinking Machines 2025): the student
samples y ~ π_θ, the teacher scores every sampled token, and the per-token reverse-KL
sample −(log π_θ(y_t) − log π_T(y_t)) is a dense reward. Minimising E_π[Σ_t log π_θ − log
π_T] = KL(π_θ ‖ π_T) with the score-function gradient is exactly policy gradient on that
reward, so it runs through the same policy loss as RL (`teacher_token_rewards`).

KDRL (Xu et al. 2025): J = J_GRPO − β·KL_k2(π_θ ‖ π_T), with β annealed from strong
imitation to reward-driven and the KD term applied only on low-reward samples
(`kd_objective`). k2 = ½(log π_θ − log π_T)² (core.kl's k2 estimator, log-ratio clamped at
±LOG_RATIO_CLAMP like every KL term) is used because its gradient is the unbiased
reverse-KL gradient on on-policy samples (seed: grpo-kl-estimators…, "KDRL").
"""

from __future__ import annotations

import torch

from posttrain.core.distill import kdrl_kd_mask, reverse_kl_tokens
from posttrain.core.kl import KL_ESTIMATORS
from posttrain.core.masking import aggregate


def teacher_token_rewards(
    logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, weight: float = 1.0
) -> torch.Tensor:
    """Dense distillation reward r_t = −weight · (log π_θ(y_t) − log π_T(y_t)).

    Args:
        logprobs: [B, T] the student's log-probs of its own samples (no grad: old_logprobs).
        teacher_logprobs: [B, T] the teacher's log-probs of the same tokens.
        mask: [B, T] 1 where a response token counts; rewards are 0 elsewhere.
        weight: scale of the distillation reward relative to task rewards.

    Returns:
        token_rewards [B, T] (detached).
    """
    per_token = reverse_kl_tokens(logprobs.detach(), teacher_logprobs.detach())  # [B, T]
    return -weight * per_token * mask


def kd_objective(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    *,
    coef: float,
    reward_threshold: float,
    aggregation: str,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KDRL's teacher term β·k2(π_θ ‖ π_T), only on samples scoring below a threshold.

    Args:
        logprobs: [B, T] student log-probs with grad.
        teacher_logprobs: [B, T] teacher log-probs of the same tokens (no grad).
        mask: [B, T] 1 where a response token counts.
        scores: [B] the samples' rewards; KD applies where score < reward_threshold
            (KDRL "reward-guided masking").
        coef: β at this step (annealed by the caller with core.distill.anneal).
        aggregation / num_tokens / num_seqs / max_len: as in policy_objective. The KD mask
            does not change the global counts, so masked samples simply contribute 0.

    Returns:
        (coef · aggregated k2 loss, metrics "distill/k2", "distill/kd_frac").
    """
    keep = kdrl_kd_mask(scores, reward_threshold).to(mask.dtype)  # [B]
    k2 = KL_ESTIMATORS["k2"](logprobs, teacher_logprobs) * keep[:, None]  # [B, T], teacher detached
    loss = aggregate(k2, mask, aggregation, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    metrics = {"distill/k2": loss.detach(), "distill/kd_frac": keep.mean().detach()}
    return coef * loss, metrics
