"""Vectorised per-group statistics over a flat batch (no Python loop over groups).

A batch of B sequences holds G samples per prompt, tagged by `group_id[B]` (any integers,
any order, groups may have different sizes). Statistics are computed with index_add over
dense group indices and gathered back to [B], so the cost is O(B) whatever the group count.
"""

from __future__ import annotations

import torch

from posttrain.core._checks import ndim
from posttrain.errors import DataError


def dense_groups(where: str, group_id: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels [B] to 0..K-1 (returns the dense index [B] and K)."""
    ndim(where, "group_id", group_id, 1)
    if group_id.shape[0] != batch:
        raise DataError(f"{where}: group_id has {group_id.shape[0]} entries but scores has {batch}")
    uniq, inverse = torch.unique(group_id, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group sum of x [B], gathered back to [B]."""
    sums = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, index, x)
    return sums[index]


def group_stats(
    x: torch.Tensor, index: torch.Tensor, k: int, unbiased: bool = True, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, count), each [B]: statistics of each sample's group, broadcast back.

    weight [B] in {0, 1} excludes samples (e.g. failed rewards) from their group's
    statistics; count is the number of included samples. Excluded samples still get their
    group's values back (the caller zeroes their advantages).
    For a constant group the mean is returned as exactly x (so x − mean == 0, no rounding).
    The std of a group with fewer than 2 included samples is defined as 0 (unbiased form:
    undefined; 0 makes the normalised advantage exactly 0: no comparison, no signal).
    """
    w = torch.ones_like(x) if weight is None else weight.to(x.dtype)
    count = group_sum(w, index, k)  # [B]
    mean = group_sum(x * w, index, k) / count.clamp_min(1.0)
    # Σx/n need not round back to x when all x are equal; force an exact 0 deviation for
    # constant groups so "zero-variance group -> zero advantage" holds bit-for-bit.
    inf = torch.full_like(x, float("inf"))
    lo = torch.zeros(k, dtype=x.dtype, device=x.device).scatter_reduce(
        0, index, torch.where(w > 0, x, inf), "amin", include_self=False
    )
    hi = torch.zeros(k, dtype=x.dtype, device=x.device).scatter_reduce(
        0, index, torch.where(w > 0, x, -inf), "amax", include_self=False
    )
    mean = torch.where((lo == hi)[index], x, mean)
    ss = group_sum(w * (x - mean) ** 2, index, k)
    denom = (count - 1.0).clamp_min(1.0) if unbiased else count.clamp_min(1.0)
    var = torch.where(count > 1, ss / denom, torch.zeros_like(ss))
    return mean, var.sqrt(), count
