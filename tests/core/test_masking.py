import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.core.masking import AGGREGATIONS, aggregate, masked_mean, masked_sum, masked_var, masked_whiten
from posttrain.errors import ConfigError, DataError

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def test_masked_reductions_hand_arithmetic():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert masked_sum(x, m).item() == pytest.approx(15.0)
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    assert torch.allclose(masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.0]))
    # values 1,2,3,4,5: mean 3, squared deviations sum 10 -> unbiased 10/4, biased 10/5
    assert masked_var(x, m).item() == pytest.approx(2.5)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2.0)
    w = masked_whiten(x, m)
    assert w[0, 2].item() == 0.0
    assert masked_mean(w, m).abs().item() < 1e-6
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-5)
    unshift = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(unshift, m).item() == pytest.approx(3.0, rel=1e-5)


def test_padding_inf_does_not_leak():
    x = torch.tensor([[1.0, float("inf")]])
    m = torch.tensor([[1.0, 0.0]])
    assert masked_mean(x, m).item() == 1.0


def test_empty_mask_no_nan():
    x = torch.randn(2, 3)
    m = torch.zeros(2, 3)
    for v in (masked_sum(x, m), masked_mean(x, m), masked_var(x, m), masked_whiten(x, m).sum()):
        assert torch.isfinite(v).all() and v.item() == 0.0
    for mode in MODES:
        assert aggregate(x, m, mode).item() == 0.0
    one = torch.tensor([[1.0, 0.0, 0.0]])
    assert masked_var(torch.ones(1, 3) * 7, one).item() == 0.0


def test_aggregate_modes_hand_arithmetic():
    loss = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert aggregate(loss, m, "token-mean").item() == pytest.approx(16 / 6)
    assert aggregate(loss, m, "seq-mean-token-mean").item() == pytest.approx((2 + 3) / 2)
    assert aggregate(loss, m, "seq-mean-token-sum").item() == pytest.approx((4 + 12) / 2)
    assert aggregate(loss, m, "seq-mean-token-sum-norm").item() == pytest.approx(16 / (2 * 4))
    assert aggregate(loss, m, "seq-mean-token-sum-norm", max_len=8).item() == pytest.approx(1.0)


def test_aggregate_sequence_level_loss():
    loss = torch.tensor([1.0, 2.0, 9.0])
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert aggregate(loss, m, "token-mean").item() == pytest.approx(1.5)


def test_aggregate_bad_inputs():
    with pytest.raises(ConfigError, match="token-mean"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "token_mean")
    with pytest.raises(DataError, match="mask shape"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 3))
    assert sorted(AGGREGATIONS.names()) == sorted(MODES)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(2, 7),
    t=st.integers(1, 6),
    split=st.integers(1, 6),
    mode=st.sampled_from(MODES),
)
def test_aggregate_microbatch_invariance(seed, b, t, split, mode):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    whole = aggregate(loss, mask, mode, max_len=t)
    n_tok = mask.sum()
    n_seq = (mask.sum(-1) > 0).sum()
    k = min(split, b - 1)
    parts = [(loss[:k], mask[:k]), (loss[k:], mask[k:])]
    total = sum(aggregate(lo, ma, mode, num_tokens=n_tok, num_seqs=n_seq, max_len=t) for lo, ma in parts)
    assert torch.allclose(total, whole, atol=1e-12)


def test_bf16_inputs_upcast():
    x = torch.randn(4, 64).bfloat16()
    m = torch.ones(4, 64)
    out = aggregate(x, m, "token-mean")
    assert out.dtype == torch.float32
    assert torch.allclose(out, x.float().mean(), atol=1e-6)
    assert torch.isfinite(masked_whiten(x, m)).all()
