"""The policy objective of every online method: policy loss + KL loss − entropy bonus.

One function, `policy_objective`, turns one micro-batch into a scalar loss and detached
metrics by calling `core/`: the policy loss is looked up in `POLICY_LOSSES` (PG, PPO,
GSPO, CISPO, Kimi), the KL-as-loss estimator in `KL_ESTIMATORS` (k1, k2, k3, k3_is), and
everything is reduced with one `aggregate(mode)` whose global counts make gradient
accumulation exact (the sum over micro-batches of this loss equals the loss of the whole
minibatch).

Objective (to minimise), per token t of sequence b, with m = mask and w the optional
train/inference importance weight (TIS, Yao et al. 2025):

    L = agg( w · ℓ_policy(logπ, logπ_old, A) + β_kl · k(logπ, logπ_ref) − c_ent · H )

where ℓ_policy is the chosen registry loss (e.g. PPO: −min(r·A, clip(r, 1−ε_low,
1+ε_high)·A)). Deviation from the GRPO paper (Shao et al. 2024, eq. 3): the KL term is
aggregated with the same mode as the policy term instead of always per-sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.algos.spec import RLSpec
from posttrain.core.advantages import ADVANTAGES
from posttrain.core.kl import KL_ESTIMATORS
from posttrain.core.masking import aggregate, masked_mean
from posttrain.core.policy_losses import POLICY_LOSSES


def policy_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy_loss: str,
    loss_kwargs: dict[str, Any],
    aggregation: str,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
    is_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss + KL loss − entropy bonus for one micro-batch, aggregated.

    Args:
        logprobs: [B, T] log π_θ of the sampled tokens, with grad.
        old_logprobs: [B, T] log π_old (the policy that produced the batch, no grad).
        advantages: [B, T] per-token advantages (already filtered and masked).
        mask: [B, T] 1 where a response token counts.
        policy_loss: name in POLICY_LOSSES.
        loss_kwargs: the policy loss's keyword arguments, passed as they are: the inputs it
            declares (`POLICY_LOSSES.needs`) and its options' fields; {} = its defaults.
            `rl_objective` builds them from the spec.
        aggregation: name in AGGREGATIONS.
        num_tokens / num_seqs / max_len: GLOBAL counts of the whole optimiser step (all
            micro-batches), so that summing this over micro-batches is exact.
        is_weights: [B, T] optional stop-gradient truncated IS weights π_old/μ (TIS).
        entropy: [B, T] per-token entropy of π_θ (with grad when entropy_coef > 0).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        ref_logprobs: [B, T] log π_ref; required when kl_coef > 0.
        kl_estimator: name in KL_ESTIMATORS for the KL-as-loss term.
        kl_coef: β of the KL loss (0 disables it and its reference forward).

    Returns:
        (loss scalar with grad, metrics: detached scalar tensors — "policy/loss",
        "kl/loss", "policy/entropy" plus the policy loss's own metrics).
    """
    counts = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_len": max_len}
    per_token, metrics = POLICY_LOSSES[policy_loss](logprobs, old_logprobs, advantages, mask, **loss_kwargs)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    pg_loss = aggregate(per_token, mask, aggregation, **counts)
    loss = pg_loss
    metrics = {k: v.detach() for k, v in metrics.items()}
    metrics["policy/loss"] = pg_loss.detach()

    if kl_coef > 0.0:
        if ref_logprobs is None or kl_estimator is None:
            raise ValueError("policy_objective: kl_coef > 0 needs ref_logprobs and kl_estimator")
        kl_inputs = KL_ESTIMATORS.inputs(kl_estimator, {"old_logprobs": old_logprobs})  # k3_is reads it
        kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs, **kl_inputs)  # [B, T]
        kl_loss = aggregate(kl, mask, aggregation, **counts)
        loss = loss + kl_coef * kl_loss
        metrics["kl/loss"] = kl_loss.detach()

    if entropy is not None:
        metrics["policy/entropy"] = masked_mean(entropy.detach(), mask)
        if entropy_coef > 0.0:
            loss = loss - entropy_coef * aggregate(entropy, mask, aggregation, **counts)
    return loss, metrics


def estimate_advantages(
    spec: RLSpec,
    *,
    scores: torch.Tensor | None,
    mask: torch.Tensor,
    group_id: torch.Tensor,
    token_rewards: torch.Tensor | None,
    values: torch.Tensor | None,
    baseline: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [B, T] and returns [B, T] of the spec's estimator (core/advantages.py).

    scores: [B] summed rewards (None: only token rewards count, e.g. pure distillation).
    token_rewards: [B, T] dense rewards (KL-in-reward, teacher, PRM) or None.
    values: [B, T] critic values or None. baseline: the running-mean baseline b.
    The estimator receives only the inputs it declares (`ADVANTAGES.needs`: e.g. GRPO gets
    scores and group_id, GAE values, γ and λ) plus the fields of `spec.advantage_options`.
    """
    available = {
        "scores": scores,
        "group_id": group_id,
        "token_rewards": token_rewards,
        "values": values,
        "baseline": baseline,
        "gamma": spec.gamma,
        "lam": spec.lam,
    }
    name = spec.advantage
    return ADVANTAGES[name](
        mask=mask,
        **ADVANTAGES.inputs(name, available),
        **ADVANTAGES.option_kwargs(name, spec.advantage_options),
    )


def rl_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    spec: RLSpec,
    kl_coef: float,
    ref_logprobs: torch.Tensor | None,
    scores: torch.Tensor,
    is_weights: torch.Tensor | None,
    entropy: torch.Tensor | None,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`policy_objective` with the spec's policy loss, its options, aggregation and KL.

    kl_coef: β of the KL-as-loss term now (0 when the KL is not in the loss).
    ref_logprobs: [B, T] log π_ref or None (a loss that reads it then gets old_logprobs, the
    previous iterate); scores: [B], for a loss that declares it.
    The loss receives only the inputs it declares (`POLICY_LOSSES.needs`: the clip bounds
    for PPO/GSPO/CISPO, ref_logprobs for Kimi) plus the fields of `spec.policy_loss_options`.
    """
    available = {
        "clip_eps_low": spec.clip_eps_low,
        "clip_eps_high": spec.clip_eps_high,
        "dual_clip": spec.dual_clip,
        "ref_logprobs": ref_logprobs if ref_logprobs is not None else old_logprobs,
        "scores": scores,
    }
    name = spec.policy_loss
    loss_kwargs = {
        **POLICY_LOSSES.inputs(name, available),
        **POLICY_LOSSES.option_kwargs(name, spec.policy_loss_options),
    }
    return policy_objective(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        policy_loss=spec.policy_loss,
        loss_kwargs=loss_kwargs,
        aggregation=spec.aggregation,
        is_weights=is_weights,
        entropy=entropy,
        entropy_coef=spec.entropy_coef,
        ref_logprobs=ref_logprobs,
        kl_estimator=spec.kl_estimator,
        kl_coef=kl_coef,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        max_len=max_len,
    )
