"""Policy losses: one registry, one signature.

Every loss is called as
    fn(logprobs, old_logprobs, advantages, mask, *, <its needs>, <its options>)
        -> (loss [B, T], metrics)
with logprobs [B, T] (current policy, differentiable), old_logprobs [B, T] (the policy that
produced the data, no grad), advantages [B, T] and mask [B, T]. `needs` (registry metadata,
`POLICY_LOSSES.needs(name)`) names the further inputs it reads, out of ref_logprobs [B, T],
scores [B] and the spec-level clip bounds clip_eps_low / clip_eps_high / dual_clip (only the
ratio-clipping losses declare those). The signature holds exactly the needs and the fields
of the entry's options dataclass, whose defaults are the function's: an option a loss does
not have is a TypeError (and a ConfigError at config time), never silently ignored.
`loss` is per token, to be MINIMISED after `aggregate(loss, mask, mode)`. Metrics are
detached masked means over this call's tokens (fractions of active tokens), namespaced
"policy/...".

Log-ratios are clamped to ±`log_ratio_clamp` before exp: a stale token with a log-ratio
of +100 would otherwise give inf·0 = NaN in masked positions or overflow bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.core._checks import choice, compute_dtype, positive, same_shape
from posttrain.core.masking import masked_mean, masked_sum
from posttrain.core.registry import Registry
from posttrain.errors import ConfigError

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry(
    "policy loss", inputs=("ref_logprobs", "scores", "clip_eps_low", "clip_eps_high", "dual_clip")
)

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: far outside any clip range, still finite in bf16
CLIP_BOUNDS = ("clip_eps_low", "clip_eps_high")  # the spec's ratio clip, read by clipping losses


@dataclass(frozen=True)
class RatioOptions:
    """Options of the importance-ratio losses (ppo, gspo, cispo); the clip bounds themselves
    are the spec's `algo.clip_eps_low` / `algo.clip_eps_high` / `algo.dual_clip`."""

    log_ratio_clamp: float = LOG_RATIO_CLAMP  # |log r| bound before exp (see module doc)


@dataclass(frozen=True)
class KimiOptions:
    """Options of "kimi"."""

    beta: float = 1.0  # β > 0: weight of the log-ratio regulariser (the paper's τ)


def _prep(where, logprobs, old_logprobs, advantages, mask):
    same_shape(where, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    dt = compute_dtype(logprobs)
    m = mask.to(dt)
    keep = m > 0
    zero = torch.zeros((), dtype=dt, device=m.device)
    # Padded positions may hold -inf/NaN log-probs; replacing them BEFORE any arithmetic keeps
    # both the loss and its gradient finite (a where() after exp() would still leak NaN grads).
    lp = torch.where(keep, logprobs.to(dt), zero)
    old = torch.where(keep, old_logprobs.detach().to(dt), zero)
    adv = torch.where(keep, advantages.detach().to(dt), zero)
    return lp, old, adv, m


def _clip_metrics(ratio, adv, m, low, high, prefix="policy"):
    with torch.no_grad():
        hit_low = ((ratio < low) & (adv < 0)).to(m.dtype)  # the clip binds (gradient zeroed)
        hit_high = ((ratio > high) & (adv > 0)).to(m.dtype)
        return {
            f"{prefix}/clipfrac_low": masked_mean(hit_low, m),
            f"{prefix}/clipfrac_high": masked_mean(hit_high, m),
            f"{prefix}/clipfrac": masked_mean(hit_low + hit_high, m),
            f"{prefix}/ratio_mean": masked_mean(ratio, m),
        }


def _approx_kl(log_ratio, m):
    # k3 estimate of KL(π_old || π) from samples of π_old: low-variance staleness metric.
    with torch.no_grad():
        return masked_mean(torch.expm1(-log_ratio) + log_ratio, m)


@POLICY_LOSSES.register("pg")
def pg_loss(logprobs, old_logprobs, advantages, mask):
    """Vanilla policy gradient (REINFORCE, Williams 1992; A2C with critic advantages):
    loss_t = −A_t · log π(y_t).  On-policy only: it has no importance ratio, so use it with
    one gradient step per batch (or pair with truncated_is_weights).
    Shapes: logprobs, old_logprobs, advantages, mask [B, T] -> loss [B, T].
    """
    lp, old, adv, m = _prep("pg", logprobs, old_logprobs, advantages, mask)
    loss = -adv * lp
    log_ratio = (lp - old).detach()
    metrics = {
        "policy/ratio_mean": masked_mean(log_ratio.exp(), m),
        "policy/approx_kl": _approx_kl(log_ratio, m),
    }
    return loss * m, metrics


def _ratio(lp, old, clamp):
    return torch.exp((lp - old).clamp(-clamp, clamp))


@POLICY_LOSSES.register("ppo", needs={*CLIP_BOUNDS, "dual_clip"}, options=RatioOptions)
def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps_low=0.2,
    clip_eps_high=None,
    dual_clip=None,
    log_ratio_clamp=RatioOptions.log_ratio_clamp,
):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss:

        loss_t = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)),  r = π/π_old
    i.e. −min(rA, clip(r)A): the pessimistic bound, so the loss is never below the
    unclipped one. ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025).
    dual_clip: constant c > 1 (Ye et al. 2020): for A < 0 the loss is capped at −c·A, so
    a huge ratio on a bad token cannot produce an unbounded update.
    Inputs (the spec's): clip_eps_low ε_low, clip_eps_high ε_high (None = ε_low), dual_clip
    c or None; option log_ratio_clamp (see module doc). Metrics: clipfrac_low/high/dual, ratio_mean, approx_kl.
    Shapes: logprobs, old_logprobs, advantages, mask [B, T] -> loss [B, T].
    """
    lp, old, adv, m = _prep("ppo", logprobs, old_logprobs, advantages, mask)
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    positive("ppo", "clip_eps_low", clip_eps_low, allow_zero=True)
    positive("ppo", "clip_eps_high", eps_high, allow_zero=True)
    ratio = _ratio(lp, old, log_ratio_clamp)
    low, high = 1.0 - clip_eps_low, 1.0 + eps_high
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
    metrics = _clip_metrics(ratio.detach(), adv, m, low, high)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ConfigError(f"ppo: dual_clip must be > 1 (or None), got {dual_clip!r}")
        capped = torch.minimum(loss, -adv * dual_clip)
        dual_hit = (adv < 0) & (capped < loss)
        loss = torch.where(adv < 0, capped, loss)
        metrics["policy/clipfrac_dual"] = masked_mean(dual_hit.to(m.dtype).detach(), m)
    metrics["policy/approx_kl"] = _approx_kl((lp - old).detach(), m)
    return loss * m, metrics


@POLICY_LOSSES.register("gspo", needs=CLIP_BOUNDS, options=RatioOptions)
def gspo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps_low=3e-4,
    clip_eps_high=4e-4,
    log_ratio_clamp=RatioOptions.log_ratio_clamp,
):
    """GSPO (Zheng et al. 2025, eq. 5–7, the GSPO-token form).

    s_i = (π(y_i)/π_old(y_i))^(1/|y_i|) = exp(mean_t log r_t), one weight per sequence,
    clipped like PPO. Per token we use s_{i,t} = sg(s_i) · π_t / sg(π_t): its value is s_i
    for every token and its gradient is s_i ∇log π_t, so per-token advantages are allowed.
    Aggregate with "seq-mean-token-mean" to reproduce the paper's objective exactly.
    Defaults ε_low=3e-4, ε_high=4e-4 are the paper's (sequence ratios are much tighter).
    Shapes: logprobs, old_logprobs, advantages, mask [B, T] -> loss [B, T].
    """
    lp, old, adv, m = _prep("gspo", logprobs, old_logprobs, advantages, mask)
    seq_log_ratio = masked_mean(lp - old, m, dim=-1).clamp(-log_ratio_clamp, log_ratio_clamp)  # [B]
    log_s = seq_log_ratio.detach()[:, None] + lp - lp.detach()  # [B, T], value = seq ratio
    ratio = torch.exp(log_s)
    low, high = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
    metrics = _clip_metrics(ratio.detach(), adv, m, low, high)
    metrics["policy/approx_kl"] = _approx_kl((lp - old).detach(), m)
    return loss * m, metrics


@POLICY_LOSSES.register("cispo", needs=CLIP_BOUNDS, options=RatioOptions)
def cispo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps_low=None,
    clip_eps_high=0.28,
    log_ratio_clamp=RatioOptions.log_ratio_clamp,
):
    """CISPO (MiniMax-M1, 2025, eq. 4): loss_t = −sg(clip(r_t, 1−ε_low, 1+ε_high)) · A_t · log π_t.

    The IS weight is clipped and detached, so EVERY token keeps a REINFORCE gradient
    (PPO zeroes the gradient of clipped tokens; CISPO only bounds its size).
    clip_eps_low None = no lower bound (the paper's setting); clip_eps_high default 0.28
    is our choice (the paper tunes it per run).
    Shapes: logprobs, old_logprobs, advantages, mask [B, T] -> loss [B, T].
    """
    lp, old, adv, m = _prep("cispo", logprobs, old_logprobs, advantages, mask)
    ratio = _ratio(lp.detach(), old, log_ratio_clamp)
    low = 0.0 if clip_eps_low is None else 1.0 - clip_eps_low
    high = 1.0 + clip_eps_high
    weight = ratio.clamp(low, high)
    loss = -weight * adv * lp
    metrics = _clip_metrics(ratio, adv, m, low, high)
    metrics["policy/approx_kl"] = _approx_kl((lp - old).detach(), m)
    return loss * m, metrics


@POLICY_LOSSES.register("kimi", needs={"ref_logprobs"}, options=KimiOptions)
def kimi_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, beta=KimiOptions.beta):
    """Kimi k1.5 squared policy loss (Kimi Team 2025, §2.3.2; seeds: "The Kimi RL Algorithm").

    Per sequence i with ℓ_i = Σ_t m (log π − log π_ref) and A_i = r_i − r̄ (the "kimi"
    advantage, i.e. the paper's τ·log Z estimated by the group mean):

        L_i = (A_i − β·ℓ_i)² / (2β)  ==  (β/2)·(ℓ_i − A_i/β)²

    the seed's ((log π − log π_ref) − (r − r̄)/β)² up to the constant β/2, chosen so that
    at ℓ = 0 the gradient is exactly the baselined policy gradient −A_i ∇ℓ_i, plus the
    regulariser β ℓ_i ∇ℓ_i. π_ref defaults to old_logprobs (the paper's reference is the
    previous iterate π_{θ_i}); pass ref_logprobs to anchor to a frozen model instead.
    Per-token form: loss_t = sg(L_i)·m_t/n_i − sg(A_i − β ℓ_i)·(log π_t − sg(log π_t)):
    each sequence's token sum equals L_i and its gradient is ∇L_i, so "seq-mean-token-sum"
    aggregation is the paper's objective. A_i is the masked mean of advantages[i].
    """
    positive("kimi", "beta", beta)
    lp, old, adv, m = _prep("kimi", logprobs, old_logprobs, advantages, mask)
    if ref_logprobs is None:
        ref = old
    else:
        same_shape("kimi", logprobs=lp, ref_logprobs=ref_logprobs)
        ref = torch.where(m > 0, ref_logprobs.detach().to(lp.dtype), torch.zeros_like(lp))
    n = m.sum(-1).clamp_min(1.0)  # [B]
    a_seq = masked_mean(adv, m, dim=-1)  # [B]
    ell = masked_sum(lp - ref, m, dim=-1)  # [B]
    resid = a_seq - beta * ell  # [B]
    seq_loss = resid.pow(2) / (2.0 * beta)
    loss = (seq_loss.detach() / n)[:, None] - resid.detach()[:, None] * (lp - lp.detach())
    metrics = {
        "policy/kimi_residual": masked_mean(resid.detach().abs(), (m.sum(-1) > 0).to(m.dtype)),
        "policy/approx_kl": _approx_kl((lp - old).detach(), m),
    }
    return loss * m, metrics


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
    level: str = "token",
) -> torch.Tensor:
    """Truncated importance weights correcting the trainer/sampler mismatch (TIS; Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training").

    w = min(π_old/π_sampler, cap): per token ("token"), or one weight per sequence from
    exp(Σ_t m (log π_old − log π_sampler)) ("sequence", broadcast to its tokens).
    Args: old_logprobs, sampling_logprobs, mask: [B, T]; cap > 0 the truncation C.
    Returns: weights [B, T], detached, 0 where mask is 0. Multiply into the per-token loss.
    """
    positive("truncated_is_weights", "cap", cap)
    choice("truncated_is_weights", "level", level, ("token", "sequence"))
    same_shape(
        "truncated_is_weights", old_logprobs=old_logprobs, sampling_logprobs=sampling_logprobs, mask=mask
    )
    dt = compute_dtype(old_logprobs)
    m = mask.to(dt)
    log_w = (old_logprobs.detach().to(dt) - sampling_logprobs.detach().to(dt)) * m
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(m)
    log_cap = torch.log(torch.tensor(cap, dtype=dt))
    return torch.exp(torch.minimum(log_w, log_cap)) * m  # clamp in log space: no overflow


def off_policy_sequence_mask(
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl_threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2 off-policy sequence masking (DeepSeek-AI 2025, §3.1, "Off-Policy
    Sequence Masking"): drop sequence i when its advantage is negative AND the policy being
    trained has drifted from the one that sampled it by more than δ:

        keep_i = not (A_i < 0  and  (1/|y_i|) Σ_t (log π_sampler − log π_θ) > δ)

    π_θ is the CURRENT policy (pass the detached training log-probs of this minibatch), so
    the mask reacts to the train–inference gap (π_old vs the sampler) and to staleness
    (π_θ vs π_old, after earlier minibatches or policy versions) together: π_θ/μ =
    (π_old/μ)·(π_θ/π_old). Negative samples that the current policy would rarely produce
    teach little and destabilise; positive ones are always kept. A_i = masked mean of
    advantages[i].
    Args: logprobs (current policy), sampling_logprobs, advantages, mask: [B, T];
    kl_threshold δ >= 0. Returns: keep [B] bool. Use as mask * keep[:, None].
    """
    positive("off_policy_sequence_mask", "kl_threshold", kl_threshold, allow_zero=True)
    same_shape(
        "off_policy_sequence_mask",
        logprobs=logprobs,
        sampling_logprobs=sampling_logprobs,
        advantages=advantages,
        mask=mask,
    )
    dt = compute_dtype(logprobs)
    m = mask.to(dt)
    kl = masked_mean(sampling_logprobs.detach().to(dt) - logprobs.detach().to(dt), m, dim=-1)  # [B]
    a_seq = masked_mean(advantages.detach().to(dt), m, dim=-1)  # [B]
    return ~((a_seq < 0) & (kl > kl_threshold))
