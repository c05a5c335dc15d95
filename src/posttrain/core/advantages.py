"""Advantage estimators: one registry, one signature.

Every estimator is called with keywords only,
    fn(*, mask, <its needs>, <its options>) -> (advantages [B, T], returns [B, T])
where mask [B, T] is 1 on a response token that counts and `needs` (registry metadata,
`ADVANTAGES.needs(name)`) names the inputs it reads, out of: scores [B] (outcome reward per
sequence), group_id [B] (same id = same prompt, G samples each), token_rewards [B, T]
(dense rewards, e.g. -β·k1 KL shaping or PRM step rewards), values [B, T] (critic),
baseline (a running-mean b) and the spec-level gamma γ / lam λ. An estimator's signature
holds exactly its needs and the fields of its options dataclass (whose defaults are the
function's), so an input it would ignore is a TypeError, not silently dropped; validation
reads `needs` (group_id: G >= 2; values: a critic; token_rewards: dense rewards reach it).
Outputs are 0 where mask is 0 and never NaN (empty masks, singleton groups and
zero-variance groups are all defined below).

A non-finite score (NaN/inf: the reward failed) excludes that sample: it is left out of
every group/batch statistic and gets advantage 0 and return 0.

Outcome rewards enter the token stream at the LAST active token of each sequence; a
sequence's return-to-go G_t = Σ_{k>=t} γ^{k-t} r_k then carries the score to every token.
For critic-free estimators `returns` is that return-to-go (useful as a logged target);
only GAE's returns are meant as value targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.core._checks import choice, compute_dtype, ndim, positive, same_shape
from posttrain.core._groups import dense_groups, group_stats
from posttrain.core.masking import masked_var, masked_whiten
from posttrain.core.registry import Registry
from posttrain.errors import DataError

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGES: Registry[AdvantageFn] = Registry(
    "advantage estimator",
    inputs=("scores", "group_id", "token_rewards", "values", "baseline", "gamma", "lam"),
)


@dataclass(frozen=True)
class GAEOptions:
    """Options of "gae" (γ and λ are the spec's `algo.gamma` / `algo.lam`)."""

    whiten: bool = False  # masked_whiten the advantages over the batch (PPO practice)


@dataclass(frozen=True)
class GRPOOptions:
    """Options of "grpo"."""

    scale: Literal["group", "batch", "none"] = "group"  # std to divide by (none: Dr. GRPO)
    std_eps: float = 1e-6  # added to the std; bounds |A| when a group has tiny spread
    unbiased_std: bool = True  # sample std (n−1, torch.std as in TRL/verl) or population (n)


@dataclass(frozen=True)
class WhitenOptions:
    """Options of the globally whitened REINFORCE++ estimators."""

    std_eps: float = 1e-8  # variance epsilon of the batch whitening


def _need(where: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            raise DataError(f"advantage estimator {where!r} needs {name}, got None")


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place scores [B] at each row's last active token -> [B, T] (empty rows get nothing)."""
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, t, torch.full_like(t, -1)).max(dim=1).values  # [B]
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last.clamp_min(0)] = scores * (last >= 0).to(scores.dtype)
    return out


def _returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{k>=t, mask_k=1} γ^{(#active steps from t to k)} r_k; masked positions are skipped
    (they neither receive nor discount), so interleaved tool/observation tokens are transparent."""
    if gamma == 1.0:  # undiscounted: a reverse cumulative sum, no loop over T
        r = rewards * mask
        return torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):  # sequential in T, vectorised in B
        m = mask[:, t]
        running = torch.where(m > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running * m
    return out


def _prepare(where, scores, mask, token_rewards):
    """Upcast, check shapes, and exclude samples whose score is not finite.

    A NaN/inf score marks a failed reward: that sample's mask row is zeroed (advantage and
    return 0) and its score replaced by 0 so it cannot poison any statistic. Returns
    (scores [B] | None, m [B, T], token_rewards [B, T] | None, valid [B] in {0, 1}).
    """
    ndim(where, "mask", mask, 2)
    dt = compute_dtype(scores if scores is not None else token_rewards if token_rewards is not None else mask)
    m = mask.to(dt)
    valid = torch.ones(mask.shape[0], dtype=dt, device=mask.device)
    if scores is not None:
        ndim(where, "scores", scores, 1)
        if scores.shape[0] != mask.shape[0]:
            raise DataError(
                f"{where}: scores has {scores.shape[0]} entries but mask has {mask.shape[0]} rows"
            )
        scores = scores.detach().to(dt)
        valid = torch.isfinite(scores).to(dt)
        scores = torch.where(valid > 0, scores, torch.zeros_like(scores))
        m = m * valid[:, None]
    if token_rewards is not None:
        same_shape(where, mask=mask, token_rewards=token_rewards)
        token_rewards = torch.where(m > 0, token_rewards.detach().to(dt), torch.zeros_like(m))
    return scores, m, token_rewards, valid


def _rewards(scores, m, token_rewards):
    r = torch.zeros_like(m) if scores is None else last_token_rewards(scores, m)
    return r if token_rewards is None else r + token_rewards * m


@ADVANTAGES.register("gae", needs={"scores", "token_rewards", "values", "gamma", "lam"}, options=GAEOptions)
def gae(
    *,
    mask,
    scores=None,
    token_rewards=None,
    values=None,
    gamma=1.0,
    lam=0.95,
    whiten=GAEOptions.whiten,
):
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16).

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = Σ_l (γλ)^l δ_{t+l},  returns_t = A_t + V_t.
    r_t = token_rewards (+ score at the last token). V after the last active token is 0
    (episode ends). λ=0 gives the TD error, λ=1 the Monte-Carlo return minus V.
    Masked positions are skipped (not terminal), so the recursion jumps over them.
    Inputs gamma (γ), lam (λ) in [0, 1] (the spec's); option whiten: masked_whiten the
    advantages over the batch (PPO practice; returns are computed before whitening).
    Shapes: values [B, T] required; scores [B] and/or token_rewards [B, T].
    """
    _need("gae", values=values)
    if scores is None and token_rewards is None:
        raise DataError("advantage estimator 'gae' needs scores or token_rewards, got neither")
    scores, m, token_rewards, valid = _prepare("gae", scores, mask, token_rewards)
    same_shape("gae", mask=mask, values=values)
    v = values.detach().to(m.dtype) * m
    r = _rewards(scores, m, token_rewards)
    adv = torch.zeros_like(r)
    next_v = torch.zeros_like(r[:, 0])
    carry = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * carry
        carry = torch.where(mt > 0, a, carry)
        next_v = torch.where(mt > 0, v[:, t], next_v)
        adv[:, t] = a * mt
    returns = (adv + v) * m
    if whiten:
        adv = masked_whiten(adv, m)
    return adv, returns


def _broadcast(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return a[:, None] * m  # [B] -> [B, T]


@ADVANTAGES.register("grpo", needs={"scores", "group_id"}, options=GRPOOptions)
def grpo(
    *,
    scores,
    mask,
    group_id=None,
    scale=GRPOOptions.scale,
    std_eps=GRPOOptions.std_eps,
    unbiased_std=GRPOOptions.unbiased_std,
):
    """Group-relative advantage (DeepSeekMath, Shao et al. 2024, eq. 3 outcome supervision).

    A_i = (r_i − mean_g(r)) / (std + std_eps), same for every token of sequence i.
    Options (GRPOOptions): scale: "group" = std of the sample's group (GRPO); "batch" = std
    of the whole batch (more stable for small G); "none" = no division (Dr. GRPO, Liu et
    al. 2025). std_eps: added to the std, bounds |A| when a group has tiny spread.
    unbiased_std: sample std (n−1, as torch.std in TRL/verl) or population std (n).
    Singleton group: std := 0 and r − mean = 0, so A = 0. Zero-variance group: A = 0 exactly.
    Shapes: scores [B], group_id [B], mask [B, T] -> [B, T].
    """
    _need("grpo", scores=scores, group_id=group_id)
    choice("grpo", "scale", scale, ("group", "batch", "none"))
    positive("grpo", "std_eps", std_eps, allow_zero=scale == "none")
    scores, m, _tr, valid = _prepare("grpo", scores, mask, None)
    idx, k = dense_groups("grpo", group_id, scores.shape[0])
    mean, std, _count = group_stats(scores, idx, k, unbiased=unbiased_std, weight=valid)
    centred = scores - mean
    if scale == "group":
        a = centred / (std + std_eps)
    elif scale == "batch":
        a = centred / (masked_var(scores, valid, unbiased=unbiased_std).sqrt() + std_eps)
    else:
        a = centred
    return _broadcast(a, m), _broadcast(scores, m)


@ADVANTAGES.register("dr_grpo", needs={"scores", "group_id"})
def dr_grpo(*, scores, mask, group_id=None):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO without the
    std division, A_i = r_i − mean_g(r). Pair with aggregate mode "seq-mean-token-sum-norm".
    No options: without a std there is nothing for std_eps or unbiased_std to change.
    Shapes: scores [B], group_id [B], mask [B, T] -> (advantages, returns) [B, T].
    """
    return grpo(scores=scores, mask=mask, group_id=group_id, scale="none")


@ADVANTAGES.register("kimi", needs={"scores", "group_id"})
def kimi(*, scores, mask, group_id=None):
    """Kimi k1.5 baseline (Kimi Team 2025, §2.3.2): A_i = r_i − mean_g(r), no std division.
    Numerically identical to dr_grpo; kept as its own name so configs read like the paper.
    Shapes: scores [B], group_id [B], mask [B, T] -> (advantages, returns) [B, T].
    """
    return grpo(scores=scores, mask=mask, group_id=group_id, scale="none")


@ADVANTAGES.register("rloo", needs={"scores", "group_id"})
def rloo(*, scores, mask, group_id=None):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, eq. 7).

    A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j  ==  G/(G−1) · (r_i − mean_g(r)).
    Singleton group (G=1): no other sample to compare with, A := 0.
    Shapes: scores [B], group_id [B] -> [B, T].
    """
    _need("rloo", scores=scores, group_id=group_id)
    scores, m, _tr, valid = _prepare("rloo", scores, mask, None)
    idx, k = dense_groups("rloo", group_id, scores.shape[0])
    mean, _std, count = group_stats(scores, idx, k, weight=valid)
    # G/(G-1)·(r − mean) is the same number as r − LOO mean, but is exactly 0 for constant groups.
    a = torch.where(
        count > 1, count / (count - 1.0).clamp_min(1.0) * (scores - mean), torch.zeros_like(scores)
    )
    return _broadcast(a, m), _broadcast(scores, m)


@ADVANTAGES.register("reinforce", needs={"scores", "token_rewards", "baseline", "gamma"})
def reinforce(*, mask, scores=None, token_rewards=None, baseline=0.0, gamma=1.0):
    """REINFORCE with a constant baseline (Williams 1992): A_t = G_t − b.

    G_t is the γ-discounted return-to-go of token_rewards plus the score at the last token.
    baseline: b, a float or 0-dim tensor, typically a running mean of past scores kept by
    the caller (the estimator is stateless; an action-independent b leaves it unbiased).
    Shapes: scores [B] and/or token_rewards [B, T], mask [B, T] -> [B, T] each.
    """
    if scores is None and token_rewards is None:
        raise DataError("advantage estimator 'reinforce' needs scores or token_rewards, got neither")
    scores, m, token_rewards, valid = _prepare("reinforce", scores, mask, token_rewards)
    returns = _returns_to_go(_rewards(scores, m, token_rewards), m, gamma)
    b = torch.as_tensor(baseline, dtype=m.dtype, device=m.device)
    return (returns - b) * m, returns


@ADVANTAGES.register("reinforce_pp", needs={"scores", "token_rewards", "gamma"}, options=WhitenOptions)
def reinforce_pp(*, mask, scores=None, token_rewards=None, gamma=1.0, std_eps=WhitenOptions.std_eps):
    """REINFORCE++ (Hu et al. 2025): γ-discounted token returns (KL shaping usually arrives
    in token_rewards), then GLOBAL batch whitening: A = (G − mean_batch) / sqrt(var_batch + eps).
    std_eps: variance epsilon of the whitening.
    Shapes: scores [B] and/or token_rewards [B, T], mask [B, T] -> [B, T] each.
    """
    if scores is None and token_rewards is None:
        raise DataError("advantage estimator 'reinforce_pp' needs scores or token_rewards, got neither")
    scores, m, token_rewards, valid = _prepare("reinforce_pp", scores, mask, token_rewards)
    returns = _returns_to_go(_rewards(scores, m, token_rewards), m, gamma)
    return masked_whiten(returns, m, eps=std_eps), returns


@ADVANTAGES.register(
    "reinforce_pp_baseline", needs={"scores", "group_id", "token_rewards", "gamma"}, options=WhitenOptions
)
def reinforce_pp_baseline(
    *, scores, mask, group_id=None, token_rewards=None, gamma=1.0, std_eps=WhitenOptions.std_eps
):
    """REINFORCE++-baseline (Hu et al. 2025, §3): subtract the group mean of the scores
    (the per-prompt baseline), add dense token_rewards, take γ-returns, whiten globally.
    Shapes: scores [B], group_id [B], token_rewards [B, T] | None, mask [B, T] -> [B, T] each.
    """
    _need("reinforce_pp_baseline", scores=scores, group_id=group_id)
    scores, m, token_rewards, valid = _prepare("reinforce_pp_baseline", scores, mask, token_rewards)
    idx, k = dense_groups("reinforce_pp_baseline", group_id, scores.shape[0])
    mean, _std, _n = group_stats(scores, idx, k, weight=valid)
    returns = _returns_to_go(_rewards(scores - mean, m, token_rewards), m, gamma)
    return masked_whiten(returns, m, eps=std_eps), returns


def prm_token_rewards(
    step_scores: torch.Tensor, step_token_index: torch.Tensor, mask: torch.Tensor, initial: float = 0.0
) -> torch.Tensor:
    """Dense rewards from a process reward model: r_k = PRM(x, y≤k) − PRM(x, y≤k−1).

    (Lightman et al. 2023 PRMs; differencing as in "PRM as dense reward", so that the
    rewards telescope: Σ_k r_k = PRM(final) − initial and a shaped return stays potential-based.)
    Args:
        step_scores: [B, S] PRM score after each step (prefix score).
        step_token_index: [B, S] int index in [0, T) of each step's last token; −1 marks
            padding steps (valid steps must form a prefix of the S axis).
        mask: [B, T]; rewards landing on masked tokens are dropped.
        initial: PRM value before the first step (the empty prefix).
    Returns: token_rewards [B, T], feed to any estimator's `token_rewards`.
    """
    same_shape("prm_token_rewards", step_scores=step_scores, step_token_index=step_token_index)
    ndim("prm_token_rewards", "step_scores", step_scores, 2)
    dt = compute_dtype(step_scores)
    s = step_scores.to(dt)
    valid = (step_token_index >= 0).to(dt)
    prev = torch.cat([torch.full_like(s[:, :1], initial), s[:, :-1]], dim=1)
    diffs = (s - prev) * valid  # [B, S]
    out = torch.zeros(mask.shape, dtype=dt, device=s.device)
    out.scatter_add_(1, step_token_index.long().clamp_min(0), diffs)
    return out * mask.to(dt)
