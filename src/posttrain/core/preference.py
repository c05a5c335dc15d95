"""Pairwise preference losses (offline DPO family) and the reward-model loss.

Shapes: B preference pairs. Inputs are SUMMED sequence log-probs [B] of the chosen and
rejected completions under the policy (with grad) and the frozen reference (no grad),
plus completion lengths [B] for the length-normalised losses. Every loss returns
(loss [B], metrics) with loss to be minimised (the caller averages over GLOBAL pairs) and
detached metrics namespaced "pref/...".

With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    dpo     −(1−ε)·log σ(β h) − ε·log σ(−β h)       Rafailov et al. 2023 eq. 7; ε = cDPO smoothing
    ipo     (h − 1/(2β))²                              Azar et al. 2023 eq. 17 (β plays τ)
    simpo   −log σ(β (log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)   Meng et al. 2024 eq. 6, no reference
    ln_dpo  DPO with each log-ratio divided by its length (length-normalised DPO)
    hinge   max(0, 1 − β h)                            SLiC-HF, Zhao et al. 2023
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.core._checks import compute_dtype, positive, same_shape
from posttrain.core.registry import Registry
from posttrain.errors import ConfigError, DataError

PreferenceFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
PREFERENCE_LOSSES: Registry[PreferenceFn] = Registry("preference loss")

REFERENCE_FREE = ("simpo",)
LENGTH_NORMALISED = ("simpo", "ln_dpo")


def _lengths(where, lengths, like):
    if lengths is None:
        raise DataError(f"preference loss {where!r} needs chosen_lengths and rejected_lengths, got None")
    same_shape(where, lengths=lengths, logps=like)
    return lengths.to(like.dtype).clamp_min(1.0)  # an empty completion counts as length 1


def implicit_rewards(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    loss: str = "dpo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward each loss implicitly assigns to a completion, (r_chosen [B], r_rejected [B]).

    dpo/ipo/hinge: β·(log π − log π_ref) (Rafailov et al. 2023 eq. 5); ln_dpo: the same
    divided by the length; simpo: β·log π / |y| (no reference). The difference
    r_chosen − r_rejected is the quantity inside each loss (before γ / target margins).
    """
    PREFERENCE_LOSSES[loss]  # unknown names fail with the list of valid ones
    positive("implicit_rewards", "beta", beta)
    same_shape("implicit_rewards", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    dt = compute_dtype(chosen_logps)
    c, r = chosen_logps.to(dt), rejected_logps.to(dt)
    if loss not in REFERENCE_FREE:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise DataError(
                f"preference loss {loss!r} needs ref_chosen_logps and ref_rejected_logps, got None"
            )
        same_shape(
            "implicit_rewards",
            chosen_logps=chosen_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
        )
        c = c - ref_chosen_logps.detach().to(dt)
        r = r - ref_rejected_logps.detach().to(dt)
    if loss in LENGTH_NORMALISED:
        c = c / _lengths(loss, chosen_lengths, c)
        r = r / _lengths(loss, rejected_lengths, r)
    return beta * c, beta * r


def preference_metrics(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, prefix: str = "pref"
) -> dict[str, torch.Tensor]:
    """Detached means over pairs: accuracy (share with r_chosen > r_rejected; ties count as
    wrong), margin (mean r_chosen − r_rejected), and the two mean rewards. Inputs [B]."""
    with torch.no_grad():
        gap = (r_chosen - r_rejected).detach()
        return {
            f"{prefix}/accuracy": (gap > 0).to(gap.dtype).mean() if gap.numel() else gap.new_zeros(()),
            f"{prefix}/margin": gap.mean() if gap.numel() else gap.new_zeros(()),
            f"{prefix}/reward_chosen": r_chosen.detach().mean() if gap.numel() else gap.new_zeros(()),
            f"{prefix}/reward_rejected": r_rejected.detach().mean() if gap.numel() else gap.new_zeros(()),
        }


def _smoothed_sigmoid_loss(logits, label_smoothing):
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"preference loss: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    # logsigmoid is the numerically stable −softplus(−x); no exp overflow for large |logits|.
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


_P = inspect.Parameter


def _pairwise(name: str, *, beta: float):
    """Register `margin_loss(margin [B], *, beta, **options) -> loss [B]` as preference loss `name`.

    Every preference loss is a function of the implicit-reward margin r_chosen − r_rejected
    (`implicit_rewards`), so the registered function wraps the margin loss in the one call
    signature all of them share:

        loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
             chosen_lengths=None, rejected_lengths=None, <the margin loss's options>, **_)
        -> (loss [B], `preference_metrics` of the implicit rewards)

    The reference log-probs are optional only for reference-free losses (ignored there).
    The signature carries `beta`'s default and the margin loss's own keyword options: that is
    where `algos.preference` reads the default β and the valid `algo.options`.
    """

    def register(margin_loss: Callable[..., torch.Tensor]) -> PreferenceFn:
        ref_default = None if name in REFERENCE_FREE else _P.empty
        own = [
            p
            for p in inspect.signature(margin_loss).parameters.values()
            if p.kind is _P.KEYWORD_ONLY and p.name != "beta"
        ]
        signature = inspect.Signature(
            [
                _P("chosen_logps", _P.POSITIONAL_OR_KEYWORD),
                _P("rejected_logps", _P.POSITIONAL_OR_KEYWORD),
                _P("ref_chosen_logps", _P.POSITIONAL_OR_KEYWORD, default=ref_default),
                _P("ref_rejected_logps", _P.POSITIONAL_OR_KEYWORD, default=ref_default),
                _P("beta", _P.KEYWORD_ONLY, default=beta),
                _P("chosen_lengths", _P.KEYWORD_ONLY, default=None),
                _P("rejected_lengths", _P.KEYWORD_ONLY, default=None),
                *own,
                _P("_", _P.VAR_KEYWORD),
            ]
        )

        @functools.wraps(margin_loss)
        def loss(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            rc, rr = implicit_rewards(
                a["chosen_logps"],
                a["rejected_logps"],
                a["ref_chosen_logps"],
                a["ref_rejected_logps"],
                beta=a["beta"],
                chosen_lengths=a["chosen_lengths"],
                rejected_lengths=a["rejected_lengths"],
                loss=name,
            )
            options = {p.name: a[p.name] for p in own}
            return margin_loss(rc - rr, beta=a["beta"], **options), preference_metrics(rc, rr)

        loss.__signature__ = signature  # what inspect.signature reports (not margin_loss's)
        return PREFERENCE_LOSSES.register(name)(loss)

    return register


@_pairwise("dpo", beta=0.1)
def dpo_loss(margin, *, beta, label_smoothing=0.0):
    """DPO sigmoid loss; label_smoothing ε ∈ [0, 0.5) assumes a fraction ε of flipped labels
    (conservative DPO, Mitchell 2023)."""
    return _smoothed_sigmoid_loss(margin, label_smoothing)


@_pairwise("ln_dpo", beta=0.1)
def ln_dpo_loss(margin, *, beta, label_smoothing=0.0):
    """Length-normalised DPO: β·[(log π − log π_ref)(y_w)/|y_w| − (…)(y_l)/|y_l|] in the
    sigmoid, removing DPO's preference for longer chosen answers (cf. SimPO §2, R-DPO)."""
    return _smoothed_sigmoid_loss(margin, label_smoothing)


@_pairwise("ipo", beta=0.1)
def ipo_loss(margin, *, beta):
    """IPO: squared regression of h onto 1/(2β). Unlike DPO the target is finite, so h is
    pulled DOWN when it overshoots: gradients raise chosen / lower rejected only while
    h < 1/(2β). Summed (not length-averaged) log-probs, as in the paper.
    Shapes: *_logps [B] -> loss [B].
    """
    h = margin / beta
    return (h - 1.0 / (2.0 * beta)).pow(2)


@_pairwise("simpo", beta=2.0)
def simpo_loss(margin, *, beta, gamma=0.5, label_smoothing=0.0):
    """SimPO: reference-free, length-normalised rewards β·log π/|y| with target margin γ.
    Defaults β=2.0, γ=0.5 are in the paper's recommended ranges; ref log-probs are ignored.
    Shapes: chosen_logps, rejected_logps, chosen_lengths, rejected_lengths [B] -> loss [B].
    """
    return _smoothed_sigmoid_loss(margin - gamma, label_smoothing)


@_pairwise("hinge", beta=0.1)
def hinge_loss(margin, *, beta):
    """Hinge (SLiC-HF calibration loss with the reference log-ratio): relu(1 − β h).
    Pairs already separated by margin 1/β contribute no gradient.
    Shapes: *_logps [B] -> loss [B].
    """
    return torch.relu(1.0 - margin)


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss under the Bradley–Terry model (Ouyang et al. 2022 eq. 1):
    loss = −log σ(s_w − s_l − m), with the optional per-pair margin m (Llama 2, Touvron et
    al. 2023 eq. 2) demanding a larger gap for clearer preferences.
    Args: chosen_scores, rejected_scores [B] (scalar RM outputs), margin [B] or None.
    Returns: (loss [B], metrics "rm/accuracy", "rm/margin", "rm/reward_chosen", "rm/reward_rejected").
    """
    same_shape(
        "bradley_terry_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores, margin=margin
    )
    dt = compute_dtype(chosen_scores)
    gap = chosen_scores.to(dt) - rejected_scores.to(dt)
    if margin is not None:
        gap = gap - margin.detach().to(dt)
    metrics = preference_metrics(chosen_scores.to(dt), rejected_scores.to(dt), prefix="rm")
    return -F.logsigmoid(gap), metrics
