"""N-best preferences: every pair a ranked list induces, weighted by its score gap.

Shapes: K candidate completions of one prompt, P induced pairs.

The case-studies seed (I, "DPO in Practice", §6 "Multi-Preference & N-Best
Generalization"): "If you have K candidates {y^(k)} with a total order or pairwise
graph of preferences, train on all induced pairs (y^(i), y^(j)) where y^(i) ≻ y^(j).
Use pair weighting (e.g., by score gap or judge confidence) to focus on high-signal
comparisons."

`induced_pairs` turns K scores into the P ≤ K(K−1)/2 pairs with s_i > s_j (ties induce
no pair: they carry no preference) and their gaps s_i − s_j; a ranking is scored −rank,
so its gaps are rank differences. `pair_weights` turns gaps into loss weights: "none"
weights every pair 1 (plain all-pairs training); "gap" weights a pair by gap / c, with c
the mean gap of the training pairs, so the mean weight is 1 and the learning rate keeps
its meaning while a near-tie (small gap, likely label noise) counts less than a clear
preference. The preference losses (DPO, IPO, SimPO, ...) are unchanged: each pair's loss
is multiplied by its weight before the mean over pairs.
"""

from __future__ import annotations

import torch

from posttrain.core._checks import choice, ndim, positive
from posttrain.errors import ConfigError

PAIR_WEIGHTINGS = ("none", "gap")


def induced_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (better, worse) pairs of one prompt's K candidates.

    scores: [K] (higher is better). Returns (chosen [P] long, rejected [P] long, gaps [P]
    = scores[chosen] − scores[rejected] > 0), ordered by chosen index, then rejected index.
    """
    ndim("induced_pairs", "scores", scores, 1)
    gaps = scores[:, None] - scores[None, :]  # [K, K]: gap of (row better than column)
    chosen, rejected = torch.nonzero(gaps > 0, as_tuple=True)  # [P], [P]
    return chosen, rejected, gaps[chosen, rejected]


def pair_weights(gaps: torch.Tensor, mode: str, normalizer: float | None = None) -> torch.Tensor:
    """Loss weight of each induced pair: [P].

    gaps: [P] positive score gaps; mode: "none" (all 1) or "gap" (gap / normalizer);
    normalizer: the mean gap of the training pairs (> 0), required for "gap".
    """
    ndim("pair_weights", "gaps", gaps, 1)
    choice("pair_weights", "mode", mode, PAIR_WEIGHTINGS)
    if mode == "none":
        return torch.ones_like(gaps)
    if normalizer is None:
        raise ConfigError("pair_weights: mode 'gap' needs the normalizer (mean training gap)")
    positive("pair_weights", "normalizer", normalizer)
    return gaps / normalizer
