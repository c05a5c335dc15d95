"""N-best pair induction and gap weights (case-studies seed §6) against hand arithmetic."""

import pytest
import torch

from posttrain.core.nbest import induced_pairs, pair_weights
from posttrain.errors import ConfigError, DataError


def test_all_induced_pairs_of_four_scored_candidates_by_hand():
    # scores 3, 1, 0, 1: 0 beats 1, 2, 3; 1 and 3 (tied) beat 2; the 1-3 tie induces no pair
    chosen, rejected, gaps = induced_pairs(torch.tensor([3.0, 1.0, 0.0, 1.0]))
    assert list(zip(chosen.tolist(), rejected.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (3, 2)]
    assert gaps.tolist() == [2.0, 3.0, 2.0, 1.0, 1.0]


def test_a_total_order_of_k_induces_k_choose_2_pairs():
    chosen, rejected, gaps = induced_pairs(torch.tensor([0.5, 2.0, -1.0, 4.0, 1.0]))
    assert chosen.numel() == 10 and bool((gaps > 0).all())
    assert (3, 1) in set(zip(chosen.tolist(), rejected.tolist()))


def test_ranks_scored_as_minus_rank_give_rank_differences():
    # ranks 2, 1, 3 (1 = best) -> scores -2, -1, -3: 0 beats 2 by 1; 1 beats 0 by 1 and 2 by 2
    chosen, rejected, gaps = induced_pairs(torch.tensor([-2.0, -1.0, -3.0]))
    assert list(zip(chosen.tolist(), rejected.tolist(), gaps.tolist())) == [
        (0, 2, 1.0),
        (1, 0, 1.0),
        (1, 2, 2.0),
    ]


def test_gap_weights_over_the_mean_gap_by_hand():
    gaps = torch.tensor([2.0, 3.0, 2.0, 1.0, 1.0])  # mean 9/5 = 1.8
    w = pair_weights(gaps, "gap", normalizer=1.8)
    assert w.tolist() == pytest.approx([2 / 1.8, 3 / 1.8, 2 / 1.8, 1 / 1.8, 1 / 1.8])
    assert w.mean().item() == pytest.approx(1.0)
    assert pair_weights(gaps, "none").tolist() == [1.0] * 5
    with pytest.raises(ConfigError, match="normalizer"):
        pair_weights(gaps, "gap")
    with pytest.raises(ConfigError, match="mode"):
        pair_weights(gaps, "confidence")
    with pytest.raises(DataError, match="scores"):
        induced_pairs(torch.zeros(2, 2))
