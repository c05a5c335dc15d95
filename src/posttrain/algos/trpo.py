"""TRPO's two batch quantities: the importance-sampled surrogate and the mean KL.

Shapes: B sequences, T response tokens, V vocabulary. Both are aggregated with GLOBAL
counts so that summing over micro-batches gives the whole batch's value. The step itself
(conjugate gradient, trust-region scaling) is `posttrain.core.trpo`; the line search that
accepts or shrinks it runs in train/rl/trpo.py.

Study guide §4.1 (TRPO): maximise E[π_θ/π_old · A] subject to KL(π_old ‖ π_θ) ≤ δ. The
surrogate here is its negative (a loss), L(θ) = aggregate(−exp(log π_θ − log π_old)·A);
at θ = θ_old its gradient is the policy gradient. The KL is the exact full-vocabulary
KL(π_old(·|s_t) ‖ π_θ(·|s_t)) averaged over response tokens — per-token δ, and its
Hessian at θ_old is the Fisher matrix of the token distributions.
"""

from __future__ import annotations

import torch

from posttrain.core.distill import forward_kl_from_logits
from posttrain.core.masking import aggregate


def trpo_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> torch.Tensor:
    """−(π_θ/π_old)·A aggregated: a scalar to minimise. Inputs [B, T]; old/advantages no grad."""
    ratio = torch.exp(logprobs - old_logprobs.detach())  # [B, T]
    loss = -ratio * advantages.detach() * mask
    return aggregate(loss, mask, aggregation, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)


def trpo_kl(
    old_logits: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    num_tokens: float,
) -> torch.Tensor:
    """Σ_t mask · KL(π_old(·|s_t) ‖ π_θ(·|s_t)) / num_tokens, with grad through `logits`.

    old_logits, logits: [B, T, V] (the same response positions); mask [B, T].
    """
    kl = forward_kl_from_logits(logits, old_logits, temperature)  # [B, T] KL(π_old ‖ π_θ), π_old detached
    return (kl * mask).sum() / max(num_tokens, 1.0)
