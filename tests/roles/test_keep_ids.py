"""RLBatch.keep_ids: the compact [B, T, K] form of the sampler's [B, T, V] keep mask."""

from __future__ import annotations

import torch

from posttrain.roles.batch import keep_ids_from_mask, keep_mask_from_ids


def test_keep_ids_round_trip_exactly_with_empty_and_full_positions():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 5, 11, generator=g) < 0.3  # [B, T, V]
    mask[0, 0] = False  # after a row's end the engine keeps nothing
    mask[1, 2] = True  # an untruncated step keeps everything
    ids = keep_ids_from_mask(mask)
    assert ids.dtype == torch.long and ids.shape == (3, 5, 11)  # K = the largest support (V here)
    assert torch.equal(keep_mask_from_ids(ids, 11), mask)
    assert bool((ids[0, 0] == -1).all())


def test_keep_ids_width_is_the_largest_support():
    mask = torch.zeros(2, 4, 100, dtype=torch.bool)
    mask[0, 1, [3, 50, 99]] = True
    mask[1, 3, 7] = True
    ids = keep_ids_from_mask(mask)
    assert ids.shape == (2, 4, 3)
    assert ids[0, 1].tolist() == [3, 50, 99] and ids[1, 3].tolist() == [7, -1, -1]
    assert torch.equal(keep_mask_from_ids(ids, 100), mask)
