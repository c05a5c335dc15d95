import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.core.masking import aggregate
from posttrain.core.policy_losses import POLICY_LOSSES, off_policy_sequence_mask, truncated_is_weights
from posttrain.errors import ConfigError, DataError


def _tok(*vals):
    return torch.tensor([list(vals)], dtype=torch.float64)


def test_ppo_seed_walkthrough_case1_positive_advantage():
    # r = 0.45/0.3 = 1.5, A = +0.5, eps 0.2 -> objective min(0.75, 0.6) = 0.6, zero gradient.
    old = _tok(math.log(0.3))
    lp = _tok(math.log(0.45)).requires_grad_()
    loss, metrics = POLICY_LOSSES["ppo"](lp, old, _tok(0.5), torch.ones(1, 1), clip_eps_low=0.2)
    assert -loss.item() == pytest.approx(0.6)
    loss.sum().backward()
    assert lp.grad.item() == 0.0
    assert metrics["policy/clipfrac_high"].item() == 1.0 and metrics["policy/clipfrac_low"].item() == 0.0


def test_ppo_seed_walkthrough_case2_negative_advantage():
    # r = 0.08/0.2 = 0.4, A = -0.8: min(0.4*-0.8, 0.8*-0.8) = min(-0.32, -0.64) = -0.64.
    # The pessimistic (more negative) value is the clipped one; the seed's "min picks the
    # LESS negative value" remark is wrong. Gradient is zero: no further push down.
    old = _tok(math.log(0.2))
    lp = _tok(math.log(0.08)).requires_grad_()
    loss, metrics = POLICY_LOSSES["ppo"](lp, old, _tok(-0.8), torch.ones(1, 1))
    assert -loss.item() == pytest.approx(-0.64)
    loss.sum().backward()
    assert lp.grad.item() == 0.0
    assert metrics["policy/clipfrac_low"].item() == 1.0


def test_ppo_clip_higher_and_dual_clip():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = _tok(math.log(1.25), math.log(1.25), math.log(5.0))
    adv = _tok(1.0, 1.0, -1.0)
    sym, _ = POLICY_LOSSES["ppo"](lp, old, adv, torch.ones(1, 3), clip_eps_low=0.2)
    higher, _ = POLICY_LOSSES["ppo"](lp, old, adv, torch.ones(1, 3), clip_eps_low=0.2, clip_eps_high=0.28)
    assert sym[0, 0].item() == pytest.approx(-1.2) and higher[0, 0].item() == pytest.approx(-1.25)
    assert sym[0, 2].item() == pytest.approx(5.0)  # A<0, r=5: -min(-5, -1.2) = 5
    dual, m = POLICY_LOSSES["ppo"](lp, old, adv, torch.ones(1, 3), dual_clip=3.0)
    assert dual[0, 2].item() == pytest.approx(3.0)
    assert m["policy/clipfrac_dual"].item() == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="dual_clip"):
        POLICY_LOSSES["ppo"](lp, old, adv, torch.ones(1, 3), dual_clip=0.5)


@settings(max_examples=40, deadline=None)
@given(
    log_r=st.floats(-3, 3),
    adv=st.floats(-5, 5),
    lo=st.floats(0.0, 0.5),
    hi=st.floats(0.0, 0.5),
    dual=st.one_of(st.none(), st.floats(1.5, 10)),
)
def test_clipped_objective_never_exceeds_unclipped(log_r, adv, lo, hi, dual):
    lp, old, a = _tok(log_r), torch.zeros(1, 1, dtype=torch.float64), _tok(adv)
    loss, _ = POLICY_LOSSES["ppo"](
        lp, old, a, torch.ones(1, 1), clip_eps_low=lo, clip_eps_high=hi, dual_clip=dual
    )
    r = math.exp(log_r)
    pessimistic = min(r * adv, min(max(r, 1 - lo), 1 + hi) * adv)
    if dual is None:
        assert -loss.item() <= r * adv + 1e-12  # clipping only ever lowers the objective
        assert -loss.item() == pytest.approx(pessimistic)
    else:  # Ye et al. 2020: for A < 0 the objective is floored at c·A
        expected = max(pessimistic, dual * adv) if adv < 0 else pessimistic
        assert -loss.item() == pytest.approx(expected)


GRADCHECK_CASES = [
    # Token-level losses are checked per token (their [B, T] loss is a true function of
    # each log-prob). GSPO and Kimi are sequence objectives written per token with a
    # stop-gradient trick, so they are checked through the aggregation that defines them.
    ("pg", {}, None),
    ("ppo", {"clip_eps_low": 0.5}, None),
    ("ppo", {"clip_eps_low": 0.01, "dual_clip": 1.02}, None),
    ("gspo", {"clip_eps_low": 0.5, "clip_eps_high": 0.5}, "seq-mean-token-mean"),
    ("kimi", {"beta": 0.5}, "seq-mean-token-sum"),
]


@pytest.mark.parametrize("name,opts,mode", GRADCHECK_CASES)
def test_policy_loss_gradcheck(name, opts, mode):
    torch.manual_seed(0)
    lp = (torch.randn(2, 4, dtype=torch.float64) * 0.1 - 1).requires_grad_()
    old = lp.detach() + torch.randn(2, 4, dtype=torch.float64) * 0.05
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([[0.7], [-1.3]], dtype=torch.float64) * mask
    if mode is None:
        adv = torch.randn(2, 4, dtype=torch.float64)
        fn = lambda x: POLICY_LOSSES[name](x, old, adv, mask, **opts)[0]
    else:
        fn = lambda x: aggregate(POLICY_LOSSES[name](x, old, adv, mask, **opts)[0], mask, mode)
    assert torch.autograd.gradcheck(fn, (lp,))


def test_cispo_gradcheck_of_its_surrogate():
    # CISPO's loss is -sg(w)·A·logπ: gradcheck against that explicit function of logπ.
    torch.manual_seed(3)
    lp = (torch.randn(2, 4, dtype=torch.float64) * 0.1 - 1).requires_grad_()
    old = lp.detach() + torch.randn(2, 4, dtype=torch.float64) * 0.3
    adv, mask = torch.randn(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
    w = torch.exp(lp.detach() - old).clamp(max=1.28)
    (g,) = torch.autograd.grad(POLICY_LOSSES["cispo"](lp, old, adv, mask)[0].sum(), lp)
    assert torch.allclose(g, -w * adv)


def test_pg_gradient_is_minus_advantage():
    lp = _tok(-1.0, -2.0).requires_grad_()
    loss, _ = POLICY_LOSSES["pg"](lp, lp.detach(), _tok(0.5, -2.0), torch.ones(1, 2))
    loss.sum().backward()
    assert torch.allclose(lp.grad, _tok(-0.5, 2.0))


def test_cispo_stop_gradient_keeps_clipped_tokens():
    # ratios 1.0, 2.0 (clipped to 1.28), 0.1 (no lower bound by default)
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = _tok(0.0, math.log(2.0), math.log(0.1)).requires_grad_()
    adv = _tok(1.0, 1.0, -1.0)
    loss, _ = POLICY_LOSSES["cispo"](lp, old, adv, torch.ones(1, 3))
    loss.sum().backward()
    assert torch.allclose(lp.grad, _tok(-1.0, -1.28, 0.1))  # d/dlp of -sg(w)·A·lp = -w·A
    lp2 = lp.detach().clone().requires_grad_()
    ppo, _ = POLICY_LOSSES["ppo"](lp2, old, adv, torch.ones(1, 3), clip_eps_high=0.28)
    ppo.sum().backward()
    assert lp2.grad[0, 1].item() == 0.0  # PPO drops the clipped token's gradient; CISPO keeps it


def test_gspo_matches_sequence_level_objective():
    torch.manual_seed(1)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    old = torch.randn(2, 4, dtype=torch.float64) - 1
    lp = (old + 0.3 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    a_seq = torch.tensor([0.7, -1.2], dtype=torch.float64)
    adv = a_seq[:, None] * mask
    eps = 0.05
    loss, _ = POLICY_LOSSES["gspo"](lp, old, adv, mask, clip_eps_low=eps, clip_eps_high=eps)
    ours = aggregate(loss, mask, "seq-mean-token-mean")
    (g1,) = torch.autograd.grad(ours, lp)
    s = torch.exp(((lp - old) * mask).sum(-1) / mask.sum(-1))
    direct = -torch.minimum(s * a_seq, s.clamp(1 - eps, 1 + eps) * a_seq).mean()
    (g2,) = torch.autograd.grad(direct, lp)
    assert torch.allclose(ours, direct) and torch.allclose(g1 * mask, g2 * mask)


def test_kimi_matches_paper_sequence_loss():
    torch.manual_seed(2)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]], dtype=torch.float64)
    ref = torch.randn(2, 3, dtype=torch.float64) - 1
    lp = (ref + 0.2 * torch.randn(2, 3, dtype=torch.float64)).requires_grad_()
    a_seq = torch.tensor([0.5, -0.5], dtype=torch.float64)
    beta = 0.3
    loss, _ = POLICY_LOSSES["kimi"](lp, ref, a_seq[:, None] * mask, mask, beta=beta)
    ours = aggregate(loss, mask, "seq-mean-token-sum")
    ell = ((lp - ref) * mask).sum(-1)
    direct = ((a_seq - beta * ell) ** 2 / (2 * beta)).mean()
    (g1,) = torch.autograd.grad(ours, lp)
    (g2,) = torch.autograd.grad(direct, lp)
    assert torch.allclose(ours, direct) and torch.allclose(g1, g2)
    # At l=0 the gradient is the baselined policy gradient -A (per token).
    z = ref.clone().requires_grad_()
    loss0, _ = POLICY_LOSSES["kimi"](z, ref, a_seq[:, None] * mask, mask, beta=beta)
    (g0,) = torch.autograd.grad(loss0.sum(), z)
    assert torch.allclose(g0, -a_seq[:, None] * mask)


def test_truncated_is_weights_hand_values():
    old = _tok(math.log(0.5), math.log(0.9), 0.0)
    samp = _tok(math.log(0.25), math.log(0.9), 5.0)
    mask = _tok(1.0, 1.0, 0.0)
    tok = truncated_is_weights(old, samp, mask, cap=1.5)
    assert torch.allclose(tok, _tok(1.5, 1.0, 0.0))  # 2.0 capped to 1.5; masked -> 0
    seq = truncated_is_weights(old, samp, mask, cap=10.0, level="sequence")
    assert torch.allclose(seq, _tok(2.0, 2.0, 0.0))
    huge = truncated_is_weights(_tok(500.0), _tok(0.0), torch.ones(1, 1), cap=3.0, level="sequence")
    assert huge.item() == pytest.approx(3.0)


def test_off_policy_sequence_mask():
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    samp = torch.tensor([[-0.5, -0.5], [-0.5, -0.5], [-0.95, -0.95]])  # drift 0.5, 0.5, 0.05
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    keep = off_policy_sequence_mask(old, samp, adv, torch.ones(3, 2), kl_threshold=0.1)
    assert keep.tolist() == [False, True, True]


def test_bad_shapes_and_names_and_empty_masks():
    with pytest.raises(DataError, match="old_logprobs"):
        POLICY_LOSSES["ppo"](torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="ppo"):
        POLICY_LOSSES["ppp"]
    z = torch.zeros(2, 3)
    for name in POLICY_LOSSES.names():
        loss, metrics = POLICY_LOSSES[name](z, z, z + 1, z)
        assert torch.all(loss == 0), name
        assert all(torch.isfinite(v) for v in metrics.values()), name


def test_bf16_smoke():
    lp = (torch.randn(2, 8) - 2).bfloat16().requires_grad_()
    old = (torch.randn(2, 8) - 2).bfloat16()
    for name in POLICY_LOSSES.names():
        loss, _ = POLICY_LOSSES[name](lp, old, torch.randn(2, 8).bfloat16(), torch.ones(2, 8))
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), name
        loss.sum().backward()
        assert torch.isfinite(lp.grad.float()).all()


def test_nonfinite_values_in_padding_do_not_leak():
    lp = torch.tensor([[-1.0, -float("inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.1, -float("inf")], [-0.4, 3.0]])
    adv = torch.tensor([[1.0, float("nan")], [-1.0, 2.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    for name in POLICY_LOSSES.names():
        lp.grad = None
        loss, metrics = POLICY_LOSSES[name](lp, old, adv, mask)
        assert torch.isfinite(loss).all(), name
        aggregate(loss, mask).backward()
        assert torch.isfinite(lp.grad).all() and torch.all(lp.grad[:, 1] == 0), name
        assert all(torch.isfinite(v) for v in metrics.values()), name
