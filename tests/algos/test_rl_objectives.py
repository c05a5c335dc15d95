"""algos/ RL objectives: hand arithmetic, accumulation invariance, gradients, presets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algos.critic import critic_objective
from posttrain.algos.distill import kd_objective, teacher_token_rewards
from posttrain.algos.policy_gradient import policy_objective
from posttrain.algos.presets import METHODS, PIECE_DEFAULTS, resolve_pieces
from posttrain.core.advantages import GRPOOptions, WhitenOptions
from posttrain.core.policy_losses import RatioOptions
from posttrain.errors import ConfigError


def _scale(mask):
    """The global sizes an objective divides by, for a batch that is all of `mask`."""
    return dict(num_tokens=float(mask.sum()), num_seqs=float((mask.sum(-1) > 0).sum()), max_len=mask.shape[1])


def _pg(lp, adv, mask, **kw):
    return policy_objective(
        lp,
        lp.detach(),
        adv,
        mask,
        policy_loss=kw.pop("policy_loss", "pg"),
        loss_kwargs=kw.pop("loss_kwargs", {}),
        aggregation=kw.pop("aggregation", "token-mean"),
        **_scale(mask),
        **kw,
    )


def test_pg_token_mean_hand_arithmetic_and_gradient():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = _pg(lp, adv, mask)
    # −A·logπ per counted token: 1, 2, −1 -> mean over 3 tokens.
    assert loss.item() == pytest.approx((1.0 + 2.0 - 1.0) / 3)
    assert metrics["policy/loss"].item() == pytest.approx(2.0 / 3)
    loss.backward()
    # d/dlogπ = −A·m / N_tokens
    assert torch.allclose(lp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))


def test_kl_loss_and_entropy_bonus_hand_arithmetic():
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    adv = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    ent = torch.tensor([[1.0, 3.0]])
    loss, m = _pg(
        lp, adv, mask, ref_logprobs=ref, kl_estimator="k3", kl_coef=0.1, entropy=ent, entropy_coef=0.01
    )
    # k3 with r = π_ref/π: token 1 r = 0.5 -> 0.5 − 1 − log 0.5; token 2 r = 1 -> 0.
    k3_mean = (0.5 - 1 - math.log(0.5)) / 2
    assert m["kl/loss"].item() == pytest.approx(k3_mean, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * k3_mean - 0.01 * 2.0, rel=1e-5)
    assert m["policy/entropy"].item() == pytest.approx(2.0)


def test_is_weights_scale_the_policy_term():
    lp = torch.tensor([[-1.0, -1.0]])
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = _pg(lp, adv, mask, is_weights=w)
    assert loss.item() == pytest.approx((0.5 * 1.0 + 2.0 * 1.0) / 2)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    split=st.integers(1, 7),
    agg=st.sampled_from(
        ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
    ),
    loss_name=st.sampled_from(["pg", "ppo", "gspo", "cispo"]),
)
def test_micro_batch_sum_equals_whole_batch(seed, split, agg, loss_name):
    """Summing micro-batch losses built with the GLOBAL counts == one whole-batch loss."""
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 5
    lp = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = lp.detach() + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float((mask.sum(-1) > 0).sum()), "max_len": T}
    kw = {"policy_loss": loss_name, "loss_kwargs": {}, "aggregation": agg, **counts}
    whole, _ = policy_objective(lp, old, adv, mask, **kw)
    parts = sum(
        policy_objective(lp[s], old[s], adv[s], mask[s], **kw)[0] for s in (slice(0, split), slice(split, B))
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)
    (g_whole,) = torch.autograd.grad(whole, lp)
    (g_parts,) = torch.autograd.grad(parts, lp)
    assert torch.allclose(g_whole, g_parts, atol=1e-6)


def test_critic_objective_hand_arithmetic():
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    returns = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    loss, m = critic_objective(
        values,
        values.detach(),
        returns,
        mask,
        value_coef=0.5,
        clip_range=None,
        aggregation="token-mean",
        **_scale(mask),
    )
    # ½(V − R)² = 0.5, 2 -> mean 1.25, times c_v = 0.5
    assert m["value/loss"].item() == pytest.approx(1.25)
    assert loss.item() == pytest.approx(0.625)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.5 * 1.0 / 2, 0.5 * 2.0 / 2]]))


def test_value_clipping_keeps_pessimistic_branch():
    old = torch.tensor([[0.0]])
    values = torch.tensor([[1.0]], requires_grad=True)
    returns = torch.tensor([[1.0]])
    loss, _ = critic_objective(
        values,
        old,
        returns,
        torch.ones(1, 1),
        value_coef=1.0,
        clip_range=0.2,
        aggregation="token-mean",
        **_scale(torch.ones(1, 1)),
    )
    # unclipped error 0, clipped V = 0.2 -> ½(0.8)² wins
    assert loss.item() == pytest.approx(0.5 * 0.8**2)


def test_teacher_token_rewards_is_negative_reverse_kl_sample():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    tlp = torch.tensor([[-0.5, -2.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = teacher_token_rewards(lp, tlp, mask, weight=2.0)
    assert torch.allclose(r, torch.tensor([[-2.0 * -0.5, -2.0 * 0.5, 0.0]]))


def test_kd_objective_only_on_low_reward_samples_and_k2_gradient():
    lp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    tlp = torch.tensor([[-2.0, -1.0], [-3.0, -3.0]])
    mask = torch.ones(2, 2)
    scores = torch.tensor([0.0, 1.0])  # second sample solved: no KD on it
    loss, m = kd_objective(
        lp,
        tlp,
        mask,
        scores,
        coef=0.5,
        reward_threshold=0.5,
        aggregation="token-mean",
        **_scale(mask),
    )
    # k2 = ½·(1)², ½·0 on sample 0; sample 1 masked -> sum 0.5 over 4 tokens
    assert m["distill/k2"].item() == pytest.approx(0.5 / 4)
    assert m["distill/kd_frac"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.5 * 0.5 / 4)
    loss.backward()
    # d/dlogπ of coef·½(lp − tlp)²/N = coef·(lp − tlp)/N
    assert torch.allclose(lp.grad, torch.tensor([[0.5 * 1.0 / 4, 0.0], [0.0, 0.0]]))


def test_presets_resolve_with_override_precedence():
    p = resolve_pieces("dapo", {"clip_eps_high": 0.3, "advantage_options": {"std_eps": 1e-3}})
    assert p.clip_eps_high == 0.3  # user wins
    assert p.clip_eps_low == 0.2 and p.dynamic_sampling is True  # preset
    assert p.advantage_options == GRPOOptions(scale="group", std_eps=1e-3)  # merged, typed
    assert p.as_dict()["advantage_options"] == {"scale": "group", "std_eps": 1e-3, "unbiased_std": True}
    assert p.entropy_coef == PIECE_DEFAULTS["entropy_coef"]  # default
    assert set(p.as_dict()) == set(PIECE_DEFAULTS)


def test_preset_options_belong_to_the_preset_entry():
    # grpo's {scale: group} is not offered to rloo (which has no options) once the user picks it.
    assert resolve_pieces("grpo", {"advantage": "rloo"}).advantage_options is None
    p = resolve_pieces("grpo", {"advantage": "reinforce_pp", "advantage_options": {"std_eps": 1e-6}})
    assert p.advantage_options == WhitenOptions(std_eps=1e-6)
    assert resolve_pieces("kimi", {"policy_loss": "ppo"}).policy_loss_options == RatioOptions()
    with pytest.raises(
        ConfigError, match=r"^algo.policy_loss_options.beta: unknown option for policy loss 'ppo'"
    ):
        resolve_pieces("kimi", {"policy_loss": "ppo", "policy_loss_options": {"beta": 2.0}})


def test_every_named_method_exists_and_unknown_suggests():
    expected = {
        "reinforce",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "a2c",
        "ppo",
        "grpo",
        "dr_grpo",
        "dapo",
        "gspo",
        "cispo",
        "kimi",
        "on_policy_distill",
        "kdrl",
    }
    assert expected <= set(METHODS.names())
    with pytest.raises(ConfigError, match="did you mean 'grpo'|Did you mean 'grpo'"):
        resolve_pieces("grpoo", {})
