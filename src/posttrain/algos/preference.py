"""Offline preference optimization: DPO, IPO, SimPO, length-normalized DPO, hinge.

Shapes: B preference pairs, T completion tokens. A batch holds 2B rows: the chosen
completions first, then the rejected ones of the same prompts, so one forward scores both.

The losses themselves live in `posttrain.core.preference.PREFERENCE_LOSSES` and are picked
by name; this module only turns per-token log-probs into the sequence quantities they
take (summed log-probs and lengths) and into metrics:

* implicit reward r(x, y) = β · (log π_θ(y|x) − log π_ref(y|x)) (Rafailov et al. 2023,
  eq. 5), or β · log π_θ(y|x) / |y| for a reference-free loss (SimPO, Meng et al. 2024,
  eq. 4) — whatever `core.preference.implicit_rewards` defines for the chosen loss;
* preference accuracy: share of pairs with r_chosen > r_rejected;
* KL to the reference, estimated on the dataset's completions:
  mean over completion tokens of log π_θ − log π_ref (the k1 estimator evaluated on
  off-policy data — a drift indicator, not an unbiased KL(π_θ‖π_ref)).
"""

from __future__ import annotations

import difflib
import inspect

import torch

from posttrain.core.preference import PREFERENCE_LOSSES, REFERENCE_FREE, implicit_rewards
from posttrain.errors import ConfigError


def needs_reference(loss_name: str) -> bool:
    """Whether the named loss reads reference log-probs (False for SimPO)."""
    PREFERENCE_LOSSES[loss_name]  # unknown names fail with the valid list
    return loss_name not in REFERENCE_FREE


def default_beta(loss_name: str) -> float:
    """The loss function's own default β (e.g. 0.1 for DPO, 2.0 for SimPO)."""
    return float(inspect.signature(PREFERENCE_LOSSES[loss_name]).parameters["beta"].default)


# Keyword arguments every loss takes from this module itself, never from `algo.options`.
_FIXED_KWARGS = ("beta", "chosen_lengths", "rejected_lengths")


def loss_options(loss_name: str) -> list[str]:
    """Names of the extra options the named loss accepts (e.g. ["label_smoothing"] for dpo).

    Read from the loss function's keyword-only parameters; the core losses also take
    `**_` so that every loss has one call signature, which is why a misspelt option would
    otherwise be swallowed silently.
    """
    params = inspect.signature(PREFERENCE_LOSSES[loss_name]).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _FIXED_KWARGS]


def check_options(loss_name: str, options: dict | None) -> None:
    """Raise a one-line ConfigError when `options` holds a key the loss does not accept.

    The message names the bad key, the nearest valid one and every valid option, e.g.
    "algo.options: 'gama' is not an option of preference loss 'simpo'. Did you mean
    'gamma'? Valid: gamma, label_smoothing".
    """
    valid = loss_options(loss_name)
    for key in options or {}:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"algo.options: {key!r} is not an option of preference loss {loss_name!r}.{hint} Valid: {listed}"
            )


def sequence_logps(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and lengths of each completion.

    logprobs: [N, T] per-token log π(y_t | x, y_<t); mask: [N, T] 1 on completion tokens.
    Returns (logps [N] = Σ_t mask·logprobs, lengths [N] = Σ_t mask, float32).
    """
    mask = mask.to(logprobs.dtype)
    return (logprobs * mask).sum(dim=1), mask.sum(dim=1)


def preference_loss(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None,
    *,
    loss_name: str,
    beta: float | None,
    num_pairs: int,
    options: dict | None = None,
    nll_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean preference loss of a micro-batch's share of one optimizer step.

    logps: [2B] summed policy log-probs (chosen rows then rejected rows, with grad).
    lengths: [2B] completion token counts.
    ref_logps: [2B] summed reference log-probs (cached, no grad) or None for a
        reference-free loss.
    loss_name: a key of PREFERENCE_LOSSES ("dpo", "ipo", "simpo", "ln_dpo", "hinge").
    beta: the loss's inverse temperature β; None = the loss's own default (`default_beta`).
    num_pairs: GLOBAL number of pairs in the optimizer step (all micro-batches), so that
        summing micro-batch losses gives the step mean (accumulation invariance).
    options: extra keyword options of the loss (label_smoothing, gamma, ...); a key the
        loss does not take raises ConfigError (`check_options`).
    nll_weight: weight α of a length-normalised NLL term on the chosen completion,
        loss += α · (−log π(y_w|x) / |y_w|) — the "DPO + NLL" objective of Iterative
        Reasoning Preference Optimization (Pang et al. 2024, eq. 1), which keeps the
        chosen likelihood from falling on reasoning tasks. 0 (default) is the plain loss.
    weights: [B] per-pair loss weights (N-best pairs weighted by their score gap,
        `core.nbest.pair_weights`) or None (all 1): loss = Σ_b w_b · loss_b / num_pairs.

    Returns (scalar loss, detached metric sums over the pairs: "pref/correct",
    "pref/reward_chosen_sum", "pref/reward_rejected_sum", "pref/margin_sum",
    "pref/logps_chosen_sum", "pref/logps_rejected_sum", and when a reference is given
    "kl/ref_logratio_sum" with "kl/tokens").
    """
    fn = PREFERENCE_LOSSES[loss_name]
    check_options(loss_name, options)
    if beta is None:
        beta = default_beta(loss_name)
    n = logps.shape[0] // 2
    chosen, rejected = logps[:n], logps[n:]  # [B], [B]
    ref_chosen = ref_rejected = None
    if ref_logps is not None:
        ref_logps = ref_logps.to(logps)
        ref_chosen, ref_rejected = ref_logps[:n], ref_logps[n:]
    loss, _ = fn(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
        **(options or {}),
    )  # [B]
    nll = -chosen / lengths[:n].clamp(min=1)  # [B] per-token NLL of the chosen completion
    if nll_weight:
        loss = loss + nll_weight * nll
    if weights is not None:
        loss = loss * weights.to(loss)
    with torch.no_grad():
        r_chosen, r_rejected = implicit_rewards(
            chosen.detach(),
            rejected.detach(),
            ref_chosen,
            ref_rejected,
            beta=beta,
            chosen_lengths=lengths[:n],
            rejected_lengths=lengths[n:],
            loss=loss_name,
        )
        metrics = {
            "pref/correct": (r_chosen > r_rejected).float().sum(),
            "pref/reward_chosen_sum": r_chosen.sum(),
            "pref/reward_rejected_sum": r_rejected.sum(),
            "pref/margin_sum": (r_chosen - r_rejected).sum(),
            "pref/logps_chosen_sum": chosen.detach().sum(),
            "pref/logps_rejected_sum": rejected.detach().sum(),
            "pref/nll_chosen_sum": nll.detach().sum(),
        }
        if ref_logps is not None:
            metrics["kl/ref_logratio_sum"] = (logps.detach() - ref_logps).sum()
            metrics["kl/tokens"] = lengths.sum()
    return loss.sum() / num_pairs, metrics
