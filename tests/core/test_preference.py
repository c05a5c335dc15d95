import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.core.preference import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    implicit_rewards,
    preference_metrics,
)
from posttrain.errors import ConfigError, DataError


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_dpo_hand_value_and_label_smoothing():
    # h = (-10 - -11) - (-12 - -11.5) = 1.5 ; beta 0.1 -> logits 0.15
    args = (_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5))
    loss, m = PREFERENCE_LOSSES["dpo"](*args, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)))
    assert m["pref/accuracy"].item() == 1.0 and m["pref/margin"].item() == pytest.approx(0.15)
    smooth, _ = PREFERENCE_LOSSES["dpo"](*args, beta=0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    assert smooth.item() == pytest.approx(expected)
    with pytest.raises(ConfigError, match="label_smoothing"):
        PREFERENCE_LOSSES["dpo"](*args, beta=0.1, label_smoothing=0.7)


def test_ipo_simpo_ln_dpo_hinge_hand_values():
    c, r, rc, rr = _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5)
    lc, lr = _t(4.0), _t(2.0)
    ipo, _ = PREFERENCE_LOSSES["ipo"](c, r, rc, rr, beta=0.5)
    assert ipo.item() == pytest.approx((1.5 - 1.0) ** 2)
    simpo, _ = PREFERENCE_LOSSES["simpo"](
        c, r, None, None, beta=2.0, gamma=0.5, chosen_lengths=lc, rejected_lengths=lr
    )
    # 2*(-10/4 - -12/2) - 0.5 = 2*3.5 - 0.5 = 6.5
    assert simpo.item() == pytest.approx(math.log(1 + math.exp(-6.5)))
    ln, _ = PREFERENCE_LOSSES["ln_dpo"](c, r, rc, rr, beta=1.0, chosen_lengths=lc, rejected_lengths=lr)
    # (1/4) - (-0.5/2) = 0.5
    assert ln.item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    hinge, _ = PREFERENCE_LOSSES["hinge"](c, r, rc, rr, beta=0.5)
    assert hinge.item() == pytest.approx(0.25)  # 1 - 0.5*1.5
    with pytest.raises(DataError, match="lengths"):
        PREFERENCE_LOSSES["simpo"](c, r, None, None, beta=2.0)
    with pytest.raises(DataError, match="ref_chosen_logps"):
        PREFERENCE_LOSSES["dpo"](c, r, None, None, beta=0.1)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["dpo", "ipo", "simpo", "ln_dpo", "hinge"]),
    c=st.floats(-50, -1),
    r=st.floats(-50, -1),
    rc=st.floats(-50, -1),
    rr=st.floats(-50, -1),
    beta=st.floats(0.05, 2.0),
)
def test_gradients_raise_chosen_lower_rejected(name, c, r, rc, rr, beta):
    chosen = _t(c).requires_grad_()
    rejected = _t(r).requires_grad_()
    lengths = _t(3.0)
    loss, _ = PREFERENCE_LOSSES[name](
        chosen, rejected, _t(rc), _t(rr), beta=beta, chosen_lengths=lengths, rejected_lengths=_t(5.0)
    )
    loss.sum().backward()
    if name == "ipo" and (c - rc) - (r - rr) >= 1 / (2 * beta):
        return  # IPO regresses onto a finite target: past it, it pulls back (documented)
    # Gradient descent moves along -grad: chosen up (grad <= 0), rejected down (grad >= 0).
    assert chosen.grad.item() <= 0.0 and rejected.grad.item() >= 0.0
    if name in ("dpo", "simpo", "ln_dpo"):
        assert chosen.grad.item() < 0.0 or abs(loss.item()) < 1e-12


def test_ipo_pulls_back_past_target():
    chosen = _t(0.0).requires_grad_()
    loss, _ = PREFERENCE_LOSSES["ipo"](chosen, _t(-10.0), _t(0.0), _t(0.0), beta=1.0)  # h = 10 > 0.5
    loss.sum().backward()
    assert chosen.grad.item() > 0


def test_implicit_rewards_and_metrics():
    rc, rr = implicit_rewards(_t(-10.0, -3.0), _t(-12.0, -2.0), _t(-11.0, -3.0), _t(-11.5, -2.5), beta=0.1)
    assert torch.allclose(rc, _t(0.1, 0.0)) and torch.allclose(rr, _t(-0.05, 0.05))
    m = preference_metrics(rc, rr)
    assert m["pref/accuracy"].item() == 0.5 and m["pref/margin"].item() == pytest.approx((0.15 - 0.05) / 2)
    sc, sr = implicit_rewards(
        _t(-8.0), _t(-8.0), beta=2.0, chosen_lengths=_t(4.0), rejected_lengths=_t(2.0), loss="simpo"
    )
    assert sc.item() == pytest.approx(-4.0) and sr.item() == pytest.approx(-8.0)
    with pytest.raises(ConfigError, match="simpo"):
        implicit_rewards(_t(1.0), _t(1.0), beta=1.0, loss="simpoo")


def test_bradley_terry():
    loss, m = bradley_terry_loss(_t(2.0, 0.0), _t(1.0, 1.0), margin=_t(0.5, 0.0))
    assert torch.allclose(loss, _t(math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))))
    assert m["rm/accuracy"].item() == 0.5
    s = _t(3.0).requires_grad_()
    bradley_terry_loss(s, _t(1.0))[0].sum().backward()
    assert s.grad.item() == pytest.approx(-1 / (1 + math.exp(2.0)))


def test_bf16_and_extremes():
    c, r = torch.tensor([-1000.0, -5.0]).bfloat16(), torch.tensor([-1.0, -900.0]).bfloat16()
    lens = torch.tensor([3.0, 7.0])
    for name in PREFERENCE_LOSSES.names():
        loss, m = PREFERENCE_LOSSES[name](c, r, r, c, beta=0.5, chosen_lengths=lens, rejected_lengths=lens)
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), name
    empty, m = PREFERENCE_LOSSES["dpo"](
        torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), beta=0.1
    )
    assert empty.numel() == 0 and all(torch.isfinite(v) for v in m.values())
