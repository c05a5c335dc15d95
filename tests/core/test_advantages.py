import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.core.advantages import ADVANTAGES, prm_token_rewards
from posttrain.errors import ConfigError, DataError

SEED_REWARDS = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.5, 0.4]


def _one_group(scores, t=3):
    s = torch.tensor(scores, dtype=torch.float64)
    return dict(
        scores=s, mask=torch.ones(len(scores), t), group_id=torch.zeros(len(scores), dtype=torch.long)
    )


def test_grpo_seed_example_population_and_sample_std():
    # mean 0.55; squared deviations sum to 0.42 -> population var 0.0525, sample var 0.06.
    dev = [0.35, 0.25, 0.15, 0.05, -0.25, -0.35, -0.05, -0.15]
    for unbiased, var in ((False, 0.42 / 8), (True, 0.42 / 7)):
        adv, ret = ADVANTAGES["grpo"](**_one_group(SEED_REWARDS), unbiased_std=unbiased, std_eps=0.0 + 1e-12)
        expected = torch.tensor([d / math.sqrt(var) for d in dev], dtype=torch.float64)
        assert torch.allclose(adv[:, 0], expected, atol=1e-9)
        assert torch.allclose(adv[:, 2], adv[:, 0])
    pop, _ = ADVANTAGES["grpo"](**_one_group(SEED_REWARDS), unbiased_std=False, std_eps=1e-12)
    # The study guide prints +1.52 for response 1 from a std rounded to 0.23; exact is 1.5275.
    assert round(pop[0, 0].item(), 2) == 1.53
    assert round(0.35 / 0.23, 2) == 1.52
    samp, _ = ADVANTAGES["grpo"](**_one_group(SEED_REWARDS), std_eps=1e-12)
    assert round(samp[0, 0].item(), 4) == 1.4289


def test_grpo_scales_and_dr_grpo_kimi():
    kw = _one_group([1.0, 0.0, 0.0, 1.0])
    none, _ = ADVANTAGES["grpo"](**kw, scale="none")
    assert torch.allclose(none[:, 0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64))
    assert torch.equal(ADVANTAGES["dr_grpo"](**kw)[0], none)
    assert torch.equal(ADVANTAGES["kimi"](**kw)[0], none)
    two = dict(
        scores=torch.tensor([1.0, 0.0, 3.0, 1.0]),
        mask=torch.ones(4, 1),
        group_id=torch.tensor([0, 0, 1, 1]),
    )
    batch, _ = ADVANTAGES["grpo"](**two, scale="batch", std_eps=0.0 + 1e-12)
    # group means 0.5 and 2.0; batch sample std of [1,0,3,1] = sqrt(((0.25+1.5625+3.0625+0.5625))/3)
    bstd = math.sqrt((0.0625 + 1.5625 + 3.0625 + 0.0625) / 3)
    assert torch.allclose(batch[:, 0], torch.tensor([0.5, -0.5, 1.0, -1.0]) / bstd, atol=1e-6)
    with pytest.raises(ConfigError, match="scale"):
        ADVANTAGES["grpo"](**kw, scale="grop")


def test_rloo_two_forms_equal():
    s = torch.tensor([1.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    adv, _ = ADVANTAGES["rloo"](**_one_group(s.tolist(), t=1))
    loo = torch.stack([s[i] - (s.sum() - s[i]) / 3 for i in range(4)])
    scaled = 4 / 3 * (s - s.mean())
    assert torch.allclose(adv[:, 0], loo) and torch.allclose(loo, scaled)
    # hand value for sample 0: 1 - (0 + 0.5 + 0.25)/3 = 0.75
    assert adv[0, 0].item() == pytest.approx(0.75)


def test_singleton_and_zero_variance_groups():
    kw = dict(scores=torch.tensor([5.0, 2.0, 2.0]), mask=torch.ones(3, 2), group_id=torch.tensor([7, 9, 9]))
    grouped = [name for name in ADVANTAGES if "group_id" in ADVANTAGES.needs(name)]
    assert set(grouped) == {"grpo", "dr_grpo", "rloo", "kimi", "reinforce_pp_baseline"}
    for name in grouped:
        adv, ret = ADVANTAGES[name](**kw)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name
        assert torch.all(adv == 0), name


def _loop_grpo(scores, gid, eps):
    out = torch.zeros_like(scores)
    for g in gid.unique():
        sel = gid == g
        x = scores[sel]
        std = x.std() if x.numel() > 1 else torch.zeros(())
        out[sel] = (x - x.mean()) / (std + eps)
    return out


def _loop_rloo(scores, gid):
    out = torch.zeros_like(scores)
    for i in range(len(scores)):
        others = scores[(gid == gid[i]) & (torch.arange(len(scores)) != i)]
        out[i] = scores[i] - others.mean() if len(others) else 0.0
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 12), k=st.integers(1, 4))
def test_grouped_loop_vs_vectorized(seed, b, k):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    gid = torch.randint(0, k, (b,), generator=g) * 10 - 3  # arbitrary labels, any order
    kw = dict(scores=scores, mask=torch.ones(b, 2), group_id=gid)
    assert torch.allclose(ADVANTAGES["grpo"](**kw, std_eps=1e-6)[0][:, 0], _loop_grpo(scores, gid, 1e-6))
    assert torch.allclose(ADVANTAGES["rloo"](**kw)[0][:, 1], _loop_rloo(scores, gid))


@settings(max_examples=30, deadline=None)
@given(
    rewards=st.lists(st.floats(-5, 5), min_size=2, max_size=8),
    shift=st.floats(-100, 100),
)
def test_grpo_shift_invariance(rewards, shift):
    a, _ = ADVANTAGES["grpo"](**_one_group(rewards))
    b, _ = ADVANTAGES["grpo"](**_one_group([r + shift for r in rewards]))
    assert torch.allclose(a, b, atol=1e-6)
    c, _ = ADVANTAGES["grpo"](**_one_group([shift] * len(rewards)))
    assert torch.all(c == 0)


def test_gae_lambda_limits_and_hand_values():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, -0.1, 9.0]], dtype=torch.float64)
    tr = torch.tensor([[0.1, 0.0, 0.3, 0.0]], dtype=torch.float64)
    scores = torch.tensor([1.0], dtype=torch.float64)
    g = 0.9
    r = [0.1, 0.0, 1.3]  # score lands on the last active token
    v = [0.5, 0.2, -0.1, 0.0]  # bootstrap after the last active token is 0
    td = [r[t] + g * v[t + 1] - v[t] for t in range(3)]
    a0, ret0 = ADVANTAGES["gae"](scores=scores, mask=mask, token_rewards=tr, values=values, gamma=g, lam=0.0)
    assert torch.allclose(a0[0, :3], torch.tensor(td, dtype=torch.float64))
    assert a0[0, 3] == 0
    mc = [r[0] + g * r[1] + g * g * r[2], r[1] + g * r[2], r[2]]
    a1, ret1 = ADVANTAGES["gae"](scores=scores, mask=mask, token_rewards=tr, values=values, gamma=g, lam=1.0)
    assert torch.allclose(a1[0, :3], torch.tensor(mc, dtype=torch.float64) - values[0, :3])
    assert torch.allclose(ret1[0, :3], torch.tensor(mc, dtype=torch.float64))


def test_gae_skips_interior_masked_tokens():
    values = torch.tensor([[0.3, 123.0, 0.7]], dtype=torch.float64)
    with_gap, _ = ADVANTAGES["gae"](
        scores=torch.tensor([1.0]), mask=torch.tensor([[1.0, 0.0, 1.0]]), values=values, gamma=0.5, lam=0.5
    )
    dense, _ = ADVANTAGES["gae"](
        scores=torch.tensor([1.0]), mask=torch.ones(1, 2), values=values[:, [0, 2]], gamma=0.5, lam=0.5
    )
    assert torch.allclose(with_gap[:, [0, 2]], dense) and with_gap[0, 1] == 0


def test_reinforce_family():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([1.0, 0.0], dtype=torch.float64)
    adv, ret = ADVANTAGES["reinforce"](scores=scores, mask=mask, baseline=0.25)
    assert torch.allclose(adv, torch.tensor([[0.75, 0.75, 0.0], [-0.25, -0.25, -0.25]], dtype=torch.float64))
    adv, ret = ADVANTAGES["reinforce"](scores=scores, mask=mask, gamma=0.5)
    assert torch.allclose(ret[0], torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    pp, _ = ADVANTAGES["reinforce_pp"](scores=scores, mask=mask)
    # returns: [1,1] and [0,0,0] -> 5 tokens, mean 0.4, sample var (2*0.36+3*0.16)/4 = 0.3
    expected = (torch.tensor([1.0, 0.0]) - 0.4) / math.sqrt(0.3)
    assert torch.allclose(pp[0, :2].float(), expected[0].expand(2), atol=1e-6)
    assert torch.allclose(pp[1].float(), expected[1].expand(3), atol=1e-6)
    ppb, _ = ADVANTAGES["reinforce_pp_baseline"](
        scores=torch.tensor([1.0, 0.0, 3.0, 3.0]), mask=torch.ones(4, 1), group_id=torch.tensor([0, 0, 1, 1])
    )
    # group-centred [0.5, -0.5, 0, 0], sample std sqrt(0.5/3)
    assert torch.allclose(ppb[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]) / math.sqrt(0.5 / 3), atol=1e-5)


def test_prm_token_rewards_telescopes():
    step_scores = torch.tensor([[0.2, 0.5, 0.4], [0.9, 0.0, 0.0]])
    idx = torch.tensor([[1, 3, 4], [2, -1, -1]])
    mask = torch.ones(2, 5)
    r = prm_token_rewards(step_scores, idx, mask)
    assert torch.allclose(r[0], torch.tensor([0.0, 0.2, 0.0, 0.3, -0.1]))
    assert torch.allclose(r[1], torch.tensor([0.0, 0.0, 0.9, 0.0, 0.0]))
    assert torch.allclose(r.sum(1), torch.tensor([0.4, 0.9]))
    adv, _ = ADVANTAGES["reinforce"](scores=None, mask=mask, token_rewards=r)
    assert adv[0, 0].item() == pytest.approx(0.4)  # return-to-go of the whole response


def test_missing_inputs_and_bad_names():
    with pytest.raises(DataError, match="group_id"):
        ADVANTAGES["grpo"](scores=torch.ones(2), mask=torch.ones(2, 2))
    with pytest.raises(DataError, match="values"):
        ADVANTAGES["gae"](scores=torch.ones(2), mask=torch.ones(2, 2))
    with pytest.raises(ConfigError, match="rloo"):
        ADVANTAGES["rlo"]


def test_bf16_and_empty_mask():
    offered = dict(
        scores=torch.tensor([1.0, 0.0]).bfloat16(),
        group_id=torch.tensor([0, 0]),
        token_rewards=None,
        gamma=1.0,
    )
    offered["baseline"] = 0.0
    for name in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "reinforce"):
        adv, ret = ADVANTAGES[name](mask=torch.zeros(2, 3), **ADVANTAGES.inputs(name, offered))
        assert adv.dtype == torch.float32 and torch.isfinite(adv).all() and torch.all(adv == 0)


def test_returns_to_go_skip_masked_tokens_both_paths():
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    tr = torch.tensor([[0.5, 7.0, 0.25, 0.0]], dtype=torch.float64)  # 7.0 sits on a masked token
    scores = torch.tensor([1.0], dtype=torch.float64)
    _, undiscounted = ADVANTAGES["reinforce"](scores=scores, mask=mask, token_rewards=tr, gamma=1.0)
    assert torch.allclose(undiscounted, torch.tensor([[1.75, 0.0, 1.25, 1.0]], dtype=torch.float64))
    _, half = ADVANTAGES["reinforce"](scores=scores, mask=mask, token_rewards=tr, gamma=0.5)
    # active rewards 0.5, 0.25, 1.0 -> G = [0.5 + 0.5*(0.25 + 0.5*1), -, 0.25 + 0.5, 1.0]
    assert torch.allclose(half, torch.tensor([[0.875, 0.0, 0.75, 1.0]], dtype=torch.float64))


def test_nan_scores_are_excluded_not_propagated():
    scores = torch.tensor([1.0, 0.0, float("nan"), 0.5, float("nan")])
    gid = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.ones(5, 2)
    clean = dict(scores=torch.tensor([1.0, 0.0]), mask=torch.ones(2, 2), group_id=torch.tensor([0, 0]))
    offered = dict(scores=scores, group_id=gid, values=torch.zeros(5, 2), token_rewards=None)
    offered.update(baseline=0.0, gamma=1.0, lam=0.95)  # the estimators' own defaults
    for name in ADVANTAGES.names():
        adv, ret = ADVANTAGES[name](mask=mask, **ADVANTAGES.inputs(name, offered))
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name
        assert torch.all(adv[[2, 4]] == 0) and torch.all(ret[[2, 4]] == 0), name
        if name in ("grpo", "dr_grpo", "kimi", "rloo"):
            # the NaN sample neither shifts its group's mean nor its std
            assert torch.allclose(adv[:2], ADVANTAGES[name](**clean)[0]), name
            assert torch.all(adv[3] == 0), name  # group 1 has one valid sample


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_matches_explicit_sum_of_discounted_td_errors(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    t = 5
    values = torch.randn(2, t, generator=g, dtype=torch.float64)
    rewards = torch.randn(2, t, generator=g, dtype=torch.float64)
    lengths = [5, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths], dtype=torch.float64)
    adv, ret = ADVANTAGES["gae"](mask=mask, token_rewards=rewards, values=values, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]
        delta = [rewards[b, i].item() + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            expected = sum((gamma * lam) ** k * delta[i + k] for k in range(n - i))
            assert adv[b, i].item() == pytest.approx(expected, abs=1e-9)
            assert ret[b, i].item() == pytest.approx(expected + v[i], abs=1e-9)
        assert torch.all(adv[b, n:] == 0)
