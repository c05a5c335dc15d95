"""The critic objective of actor-critic methods (PPO, A2C).

    L_V = c_v · agg( ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²) )

the clipped value loss of PPO (Schulman et al. 2017; the clipping follows the OpenAI
baselines implementation, as in `core.value.value_loss`). R are the GAE returns
(Schulman et al. 2016) computed once per batch from the critic's values at sampling time.
"""

from __future__ import annotations

import torch

from posttrain.core.masking import aggregate
from posttrain.core.value import explained_variance, value_loss


def critic_objective(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    value_coef: float,
    clip_range: float | None,
    aggregation: str,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregated, weighted value loss of one micro-batch.

    Args:
        values: [B, T] critic predictions V(s_t) with grad.
        old_values: [B, T] predictions at sampling time (no grad), the clip centre.
        returns: [B, T] regression targets.
        mask: [B, T] 1 where a response token counts.
        value_coef: c_v, weight of the value loss in the total loss.
        clip_range: ε_v; None disables value clipping (A2C).
        aggregation: name in AGGREGATIONS; num_tokens / num_seqs / max_len are the GLOBAL
            counts of the optimiser step (exact gradient accumulation).

    Returns:
        (c_v · loss scalar, metrics "value/loss", "value/explained_variance",
        "value/mean" — detached).
    """
    per_token = value_loss(values, old_values, returns, mask, clip_range=clip_range)  # [B, T]
    loss = aggregate(per_token, mask, aggregation, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    metrics = {
        "value/loss": loss.detach(),
        "value/explained_variance": explained_variance(values.detach(), returns, mask),
        "value/mean": (values.detach() * mask).sum() / mask.sum().clamp(min=1),
    }
    return value_coef * loss, metrics
