import math

import pytest
import torch

from posttrain.core.advantages import last_token_rewards
from posttrain.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    exact_kl_from_logits,
    kl_reward_penalty,
)
from posttrain.core.value import explained_variance, value_loss
from posttrain.errors import ConfigError

POLICY = torch.tensor([[-1.2, -2.5, -0.8, -0.3]], dtype=torch.float64)
REF = torch.tensor([[-1.3, -2.0, -0.9, -1.5]], dtype=torch.float64)


def test_seed_kl_example():
    k1 = KL_ESTIMATORS["k1"](POLICY, REF)
    assert torch.allclose(k1, torch.tensor([[0.1, -0.5, 0.1, 1.2]], dtype=torch.float64))
    assert k1.sum().item() == pytest.approx(0.9)
    k3 = KL_ESTIMATORS["k3"](POLICY, REF)
    # delta = ref - policy = [-0.1, 0.5, -0.1, -1.2];  k3 = e^delta - 1 - delta
    hand = [math.exp(d) - 1 - d for d in (-0.1, 0.5, -0.1, -1.2)]
    assert torch.allclose(k3[0], torch.tensor(hand, dtype=torch.float64))
    assert (k3 >= 0).all()
    assert k3.sum().item() == pytest.approx(0.659590, abs=1e-6)  # the guide prints ~0.657
    # The guide's code (ratio pi_theta/pi_ref) would give 1.2370 instead: see docs/errata.md.
    wrong = sum(math.exp(-d) - 1 + d for d in (-0.1, 0.5, -0.1, -1.2))
    assert wrong == pytest.approx(1.236989, abs=1e-6)
    k2 = KL_ESTIMATORS["k2"](POLICY, REF)
    assert k2.sum().item() == pytest.approx(0.5 * (0.01 + 0.25 + 0.01 + 1.44))


def _pair():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    return p, q


def test_monte_carlo_estimator_properties():
    p, q = _pair()
    true_kl = (p * (p / q).log()).sum().item()
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, n, replacement=True, generator=g)
    lp, lq = p.log()[x][None], q.log()[x][None]
    est = {k: KL_ESTIMATORS[k](lp, lq)[0] for k in ("k1", "k2", "k3")}
    se = {k: v.std().item() / math.sqrt(n) for k, v in est.items()}
    assert abs(est["k1"].mean().item() - true_kl) < 5 * se["k1"]
    assert abs(est["k3"].mean().item() - true_kl) < 5 * se["k3"]
    assert est["k3"].var() < est["k1"].var()
    # k2's expectation differs from the KL by far more than its sampling error (biased).
    exact_k2 = (p * 0.5 * (p / q).log() ** 2).sum().item()
    assert abs(exact_k2 - true_kl) > 20 * se["k2"]
    assert abs(est["k2"].mean().item() - exact_k2) < 5 * se["k2"]


def test_k3_is_unbiased_off_policy():
    p, q = _pair()
    old = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()
    n = 200_000
    x = torch.multinomial(old, n, replacement=True, generator=torch.Generator().manual_seed(1))
    lp, lq, lo = p.log()[x][None], q.log()[x][None], old.log()[x][None]
    corrected = KL_ESTIMATORS["k3_is"](lp, lq, old_logprobs=lo)[0]
    plain = KL_ESTIMATORS["k3"](lp, lq)[0]
    se = corrected.std().item() / math.sqrt(n)
    assert abs(corrected.mean().item() - true_kl) < 5 * se
    assert abs(plain.mean().item() - true_kl) > 20 * plain.std().item() / math.sqrt(
        n
    )  # uncorrected is biased
    assert torch.equal(KL_ESTIMATORS["k3_is"](lp, lq)[0], plain)


def test_k2_gradient_equals_true_kl_gradient_on_policy():
    p, q = _pair()
    theta = p.log().clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    true_kl = (logp.exp() * (logp - q.log())).sum()
    (g_true,) = torch.autograd.grad(true_kl, theta)
    # E_{x~p}[grad k2(x)] with the sampling distribution held fixed (score-function free):
    logp = torch.log_softmax(theta, -1)
    k2 = KL_ESTIMATORS["k2"](logp[None], q.log()[None])[0]
    (g_k2,) = torch.autograd.grad((p * k2).sum(), theta)
    assert torch.allclose(g_k2, g_true, atol=1e-12)
    # ... whereas the same construction with k1 has zero expected gradient (sum_x grad p = 0).
    logp = torch.log_softmax(theta, -1)
    k1 = KL_ESTIMATORS["k1"](logp[None], q.log()[None])[0]
    (g_k1,) = torch.autograd.grad((p * k1).sum(), theta)
    assert torch.allclose(g_k1, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z: KL_ESTIMATORS["k2"](z, q.log()[None]), (logp.detach()[None].requires_grad_(),)
    )


def test_exact_kl_from_logits():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    kl = exact_kl_from_logits(a, b, temperature=0.5, chunk_size=4)
    p, q = torch.softmax(a / 0.5, -1), torch.softmax(b / 0.5, -1)
    assert torch.allclose(kl, (p * (p / q).log()).sum(-1))
    assert (kl >= 0).all() and torch.allclose(
        exact_kl_from_logits(a, a), torch.zeros(2, 3, dtype=torch.float64)
    )


def test_kl_penalized_token_rewards():
    """KL-in-reward shaping r_t = −β·kl_t plus the score at the last active token, as the RL
    loop builds it: kl_reward_penalty's k1 (log π_old − log π_ref; here π_ref = 1, so k1 = kl)
    and the estimators' score placement."""
    kl = torch.tensor([[0.1, -0.5, 0.1, 9.0], [0.2, 0.2, 0.2, 0.2]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    penalty = kl_reward_penalty(kl, torch.zeros_like(kl), mask, 0.1, "k1")
    r = penalty + last_token_rewards(torch.tensor([1.0, 5.0]), mask)
    assert torch.allclose(r, torch.tensor([[-0.01, 0.05, 0.99, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    c.update(9.0, 100)  # error 0.5 clipped to 0.2 -> 0.1 * (1 + 0.2*100/10000)
    assert c.value == pytest.approx(0.1002)
    c.update(5.4, 100)  # error -0.1 -> * (1 - 0.001)
    assert c.value == pytest.approx(0.1002 * 0.999)
    d = AdaptiveKLController(1.0, 1.0, 1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value and d.target == 6.0
    with pytest.raises(ConfigError, match="horizon"):
        AdaptiveKLController(0.1, 6.0, 0)


def test_kl_bf16_and_extremes():
    lp = torch.tensor([[-0.1, -80.0]]).bfloat16()
    ref = torch.tensor([[-90.0, -0.1]]).bfloat16()
    for name in KL_ESTIMATORS.names():
        out = KL_ESTIMATORS[name](lp, ref, **KL_ESTIMATORS.inputs(name, {"old_logprobs": lp}))
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), name


def test_value_loss_hand_values():
    v = torch.tensor([[1.5, 0.9]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0]])
    ret = torch.tensor([[2.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0]])
    unclipped = value_loss(v, old, ret, mask)
    assert torch.allclose(unclipped, torch.tensor([[0.125, 0.0]]))
    clipped = value_loss(v, old, ret, mask, clip_range=0.2)
    assert torch.allclose(clipped, torch.tensor([[0.32, 0.0]]))  # 0.5*max(0.25, (1.2-2)^2)
    clipped.sum().backward()
    assert v.grad[0, 0].item() == 0.0  # the clipped branch wins and is flat in v


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), ret, m).item() == pytest.approx(0.0)
    assert explained_variance(ret, torch.ones(1, 4), m).item() == 0.0
    assert explained_variance(ret, ret, torch.zeros(1, 4)).item() == 0.0


def test_kl_reward_penalty_honours_the_estimator_by_hand():
    """r_t = −β·k_t with δ = log π_ref − log π_old = [−0.5, 1.0], β = 0.5 (issue #16, item 3)."""
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: no penalty
    by_hand = {
        "k1": [-0.5 * 0.5, -0.5 * -1.0, 0.0],  # k1 = −δ
        "k2": [-0.5 * 0.125, -0.5 * 0.5, 0.0],  # k2 = δ²/2
        "k3": [-0.5 * (math.exp(-0.5) - 1 + 0.5), -0.5 * (math.e - 1 - 1.0), 0.0],  # e^δ − 1 − δ
    }
    for name, want in by_hand.items():
        got = kl_reward_penalty(old, ref, mask, 0.5, name)
        assert torch.allclose(got, torch.tensor([want]), atol=1e-6), name
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_reward_penalty(old, ref, mask, 0.5, "k3_is")


def test_policy_drift_metrics_split_gap_and_staleness_by_hand():
    """π_θ/μ = (π_old/μ)(π_θ/π_old): log(π_old/μ) = [0.2, -0.1], log(π_θ/π_old) = [0.3, 0.0]."""
    from posttrain.core.kl import policy_drift_metrics

    mu = torch.tensor([[-1.2, -0.9, -5.0]])
    old = torch.tensor([[-1.0, -1.0, -7.0]])
    cur = torch.tensor([[-0.7, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the padding token never counts
    m = policy_drift_metrics(cur, old, mu, mask)

    def k3(d):
        return math.exp(d) - 1 - d

    assert m["offpolicy/gap_log_ratio"].item() == pytest.approx((0.2 - 0.1) / 2, abs=1e-6)
    assert m["offpolicy/gap_k3"].item() == pytest.approx((k3(0.2) + k3(-0.1)) / 2, abs=1e-6)
    assert m["offpolicy/staleness_log_ratio"].item() == pytest.approx(0.3 / 2, abs=1e-6)
    assert m["offpolicy/staleness_k3"].item() == pytest.approx(k3(0.3) / 2, abs=1e-6)
