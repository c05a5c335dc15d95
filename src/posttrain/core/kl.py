"""KL divergence between the policy and a reference: per-token estimators, exact KL,
KL-in-reward shaping and coefficient controllers.

Estimators (Schulman 2020, "Approximating KL Divergence") for KL(π_θ || π_ref) from
tokens SAMPLED FROM π_θ, with log-ratio δ = log π_ref − log π_θ (so ρ = e^δ = π_ref/π_θ):
    k1 = −δ                 unbiased, high variance, can be negative
    k2 = δ²/2               biased, but ∇E[k2] = ∇KL on-policy (used as a loss)
    k3 = (e^δ − 1) − δ      unbiased (E_πθ[e^δ] = 1), non-negative, low variance
The ratio MUST be π_ref/π_θ for k3 to be unbiased under sampling from π_θ; the study
guide's code uses π_θ/π_ref, which estimates KL(π_ref || π_θ)-ish quantities instead —
see docs/errata.md. Shapes: logprobs, ref_logprobs, old_logprobs [B, T] -> [B, T].
Every estimator is fn(logprobs, ref_logprobs, *, <needs>, log_ratio_clamp); only k3_is
needs old_logprobs (registry metadata `KL_ESTIMATORS.needs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.core._checks import compute_dtype, ndim, positive, same_shape
from posttrain.core.registry import Registry

KLFn = Callable[..., torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator", inputs=("old_logprobs",))

LOG_RATIO_CLAMP = 20.0  # bounds e^δ for tokens where the two models disagree wildly


@dataclass(frozen=True)
class KLOptions:
    """Options of every KL estimator."""

    log_ratio_clamp: float = LOG_RATIO_CLAMP  # |δ| bound before exp


def _delta(where, logprobs, ref_logprobs, clamp):
    same_shape(where, logprobs=logprobs, ref_logprobs=ref_logprobs)
    dt = compute_dtype(logprobs)
    return (ref_logprobs.detach().to(dt) - logprobs.to(dt)).clamp(-clamp, clamp)


@KL_ESTIMATORS.register("k1", options=KLOptions)
def k1(logprobs, ref_logprobs, *, log_ratio_clamp=KLOptions.log_ratio_clamp):
    """k1 = log π_θ − log π_ref per token (unbiased; the classic KL-in-reward penalty).
    Shapes: logprobs, ref_logprobs [B, T] -> [B, T].
    """
    return -_delta("k1", logprobs, ref_logprobs, log_ratio_clamp)


@KL_ESTIMATORS.register("k2", options=KLOptions)
def k2(logprobs, ref_logprobs, *, log_ratio_clamp=KLOptions.log_ratio_clamp):
    """k2 = ½(log π_θ − log π_ref)² per token. Biased as a value, but on-policy its
    expected gradient equals ∇KL(π_θ||π_ref) (KDRL, GRPO-as-loss variants).
    Shapes: logprobs, ref_logprobs [B, T] -> [B, T].
    """
    return 0.5 * _delta("k2", logprobs, ref_logprobs, log_ratio_clamp).pow(2)


@KL_ESTIMATORS.register("k3", options=KLOptions)
def k3(logprobs, ref_logprobs, *, log_ratio_clamp=KLOptions.log_ratio_clamp):
    """k3 = π_ref/π_θ − 1 − log(π_ref/π_θ) per token (GRPO's KL loss, Shao et al. 2024 eq. 4).
    Shapes: logprobs, ref_logprobs [B, T] -> [B, T]; always >= 0.
    """
    d = _delta("k3", logprobs, ref_logprobs, log_ratio_clamp)
    return torch.expm1(d) - d  # expm1 keeps precision for |δ| << 1


@KL_ESTIMATORS.register("k3_is", needs={"old_logprobs"}, options=KLOptions)
def k3_is(logprobs, ref_logprobs, *, old_logprobs=None, log_ratio_clamp=KLOptions.log_ratio_clamp):
    """DeepSeek-V3.2 unbiased KL (DeepSeek-AI 2025, §3.1): (π_θ/π_old) · k3.

    Tokens come from π_old, not π_θ, once the policy has taken a step; the importance
    ratio makes E_{π_old}[(π_θ/π_old)·k3] = KL(π_θ||π_ref) again, and the gradient flows
    through both factors. Without old_logprobs (fully on-policy) it equals k3.
    """
    base = k3(logprobs, ref_logprobs, log_ratio_clamp=log_ratio_clamp)
    if old_logprobs is None:
        return base
    same_shape("k3_is", logprobs=logprobs, old_logprobs=old_logprobs)
    lp = logprobs.to(base.dtype)
    w = torch.exp((lp - old_logprobs.detach().to(base.dtype)).clamp(-log_ratio_clamp, log_ratio_clamp))
    return w * base


def exact_kl_from_logits(
    logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Exact full-vocabulary KL(p || q) = Σ_v p_v (log p_v − log q_v) per position.

    Args:
        logits_p, logits_q: [B, T, V] (or [N, V]); p = softmax(logits_p/τ), q likewise.
        temperature: τ > 0 applied to both.  chunk_size: rows per chunk (memory only; the
            graph of each chunk is kept for backward, so this bounds forward peak only).
    Returns: [B, T], non-negative up to rounding, float32/float64, differentiable in both.
    """
    same_shape("exact_kl_from_logits", logits_p=logits_p, logits_q=logits_q)
    ndim("exact_kl_from_logits", "logits_p", logits_p, (2, 3))
    positive("exact_kl_from_logits", "temperature", temperature)
    dt = compute_dtype(logits_p)
    p_flat = logits_p.reshape(-1, logits_p.shape[-1])
    q_flat = logits_q.reshape(-1, logits_q.shape[-1])
    parts = []
    for s in range(0, p_flat.shape[0], chunk_size):
        logp = torch.log_softmax(p_flat[s : s + chunk_size].to(dt) / temperature, -1)
        logq = torch.log_softmax(q_flat[s : s + chunk_size].to(dt) / temperature, -1)
        parts.append((logp.exp() * (logp - logq)).sum(-1))
    out = torch.cat(parts) if parts else p_flat.new_zeros(0, dtype=dt)
    return out.reshape(logits_p.shape[:-1])


def kl_reward_penalty(
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token KL-in-reward penalty r_t = −β · k(log π_old, log π_ref)_t on response tokens.

    The policy that sampled the tokens (π_old) is the one whose KL to the reference is
    penalised (Ziegler et al. 2019 use k1; Ouyang et al. 2022 eq. 2). `estimator` is k1,
    k2 or k3 from KL_ESTIMATORS, each a per-token penalty (k3_is is an importance-weighted
    loss and is refused: with no gradient its weight is 1 and it would silently be k3).
    Shapes: old_logprobs, ref_logprobs, mask [B, T] -> [B, T] (0 where mask is 0), detached.
    The one KL-in-reward shaping: pass the result as `token_rewards` to an advantage
    estimator together with the sequence `scores`, which it places at each row's last
    active token (core.advantages.last_token_rewards).
    """
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_reward_penalty: estimator must be k1, k2 or k3, got {estimator!r}")
    positive("kl_reward_penalty", "beta", beta, allow_zero=True)
    kl = KL_ESTIMATORS[estimator](old_logprobs.detach(), ref_logprobs)  # [B, T]
    return -beta * kl * mask.to(kl.dtype)


def policy_drift_metrics(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The off-policy drift of a batch in the seeds' two factors, π_θ/μ = (π_old/μ)·(π_θ/π_old).

    Train–inference gap, π_old vs the sampler μ: "offpolicy/gap_log_ratio" = mean log(π_old/μ)
    and "offpolicy/gap_k3" = mean k3 with δ = log π_old − log μ (KL(μ||π_old), tokens from μ).
    Staleness, π_θ vs π_old (earlier minibatches, older policy versions):
    "offpolicy/staleness_log_ratio" = mean log(π_θ/π_old) and "offpolicy/staleness_k3" = mean
    k3 with δ = log π_θ − log π_old. Means over the tokens where mask is 1; detached.
    Shapes: logprobs (current policy), old_logprobs, sampling_logprobs, mask [B, T] -> scalars.
    """
    m = mask.to(compute_dtype(logprobs))
    n = m.sum().clamp(min=1)
    out = {}
    for name, num, den in (("gap", old_logprobs, sampling_logprobs), ("staleness", logprobs, old_logprobs)):
        out[f"offpolicy/{name}_log_ratio"] = ((num.detach() - den.detach()) * m).sum() / n
        out[f"offpolicy/{name}_k3"] = (k3(den.detach(), num.detach()) * m).sum() / n
    return out


class FixedKLController:
    """Constant KL coefficient β (the GRPO/REINFORCE++ default). update() is a no-op so
    it is interchangeable with AdaptiveKLController."""

    def __init__(self, beta: float):
        positive("FixedKLController", "beta", beta, allow_zero=True)
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (fixed coefficient)."""

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state: {"value": β}."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from state_dict()."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, §2.2):

        e = clip(KL/target − 1, −max_error, max_error),   β ← β · (1 + e · n_steps / horizon)

    β grows when the measured KL overshoots the target and shrinks when it undershoots.
    Args: init_beta > 0, target KL > 0 (nats per sequence or per token, consistently with
    what you pass to update), horizon > 0 (steps to close the gap), max_error the paper's 0.2.
    """

    def __init__(self, init_beta: float, target: float, horizon: float, max_error: float = 0.2):
        positive("AdaptiveKLController", "init_beta", init_beta)
        positive("AdaptiveKLController", "target", target)
        positive("AdaptiveKLController", "horizon", horizon)
        self.value = float(init_beta)
        self.target, self.horizon, self.max_error = float(target), float(horizon), float(max_error)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β toward keeping `current_kl` (a Python float from train/) at the target."""
        err = min(max(float(current_kl) / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
            "max_error": self.max_error,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from state_dict(); missing constants keep their constructor values."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
        self.max_error = float(state.get("max_error", self.max_error))
