"""Outcome reward model: a scalar head trained with the Bradley–Terry pairwise loss.

Shapes: B preference pairs, L sequence length (prompt + completion), T completion tokens.

The reward of a (prompt, completion) is the scalar head's output at the LAST completion
token (no EOS is appended: the "reward_model" reward scores generated text as is). That
is exactly the token Hugging Face sequence-classification models pool (the right-most
non-pad token), so a reward model saved with `posttrain.engines.models.save_value_model`
and reloaded with `AutoModelForSequenceClassification.from_pretrained` gives the scores
it was trained on.

Loss (Ouyang et al. 2022, eq. 1; Bradley & Terry 1952):
    L = −log σ(r(x, y_w) − r(x, y_l) − m)
with an optional per-pair margin m (Llama-2 style, Touvron et al. 2023 §3.2.2), computed
by `posttrain.core.preference.bradley_terry_loss`.

Pointwise alternative (study guide §2.2, "Pointwise Reward Models: predict scalar scores
directly"): `pointwise_reward_loss` regresses the same read-out onto each completion's
score, L = (r(x, y) − (s − b(x)))², by `posttrain.core.pointwise.pointwise_loss`.
"""

from __future__ import annotations

import torch

from posttrain.core.pointwise import pointwise_loss
from posttrain.core.preference import bradley_terry_loss
from posttrain.engines.batching import SequenceBatch


def last_token_index(batch: SequenceBatch) -> torch.Tensor:
    """Column of each row's last completion token: [B] long.

    With prompts left-padded and completions right-padded (build_sequences), completion
    token t of row b sits at column response_start + t, so the last one is at
    response_start + (number of completion tokens) − 1. A row without completion tokens
    would point at the last prompt token; data validation rejects empty completions
    before they reach here.
    """
    lengths = batch.response_mask.sum(dim=1).long()  # [B]
    return batch.response_start + lengths.clamp(min=1) - 1


def sequence_scores(value_model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Scalar reward per sequence: [B], the head's value at the last completion token.

    value_model: a `ScalarHeadModel` (forward(input_ids, attention_mask, position_ids)
        -> values [B, L]). Gradients flow when called outside no_grad.
    """
    values = value_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )  # [B, L]
    idx = last_token_index(batch).to(values.device)
    return values.gather(1, idx[:, None]).squeeze(1).float()


def reward_model_loss(
    value_model: torch.nn.Module,
    batch: SequenceBatch,
    *,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair Bradley–Terry loss for a batch holding chosen rows then rejected rows.

    batch: 2B rows; rows [0, B) are the chosen completions, rows [B, 2B) the rejected
        completions of the same prompts (one forward pass for both halves).
    margin: [B] optional required score gap per pair (0 where absent).

    Returns (loss [B] to be averaged by the caller over the whole optimizer step, detached
    metrics as sums over the pairs so micro-batches add up: "rm/correct" (pairs ranked
    right), "rm/margin_sum" (Σ r_w − r_l), "rm/chosen_sum", "rm/rejected_sum").
    """
    scores = sequence_scores(value_model, batch)  # [2B]
    n = scores.shape[0] // 2
    chosen_scores, rejected_scores = scores[:n], scores[n:]  # [B], [B]
    loss, _ = bradley_terry_loss(chosen_scores, rejected_scores, margin)
    gap = (chosen_scores - rejected_scores).detach()  # [B]
    metrics = {
        "rm/correct": (gap > 0).float().sum(),
        "rm/margin_sum": gap.sum(),
        "rm/chosen_sum": chosen_scores.detach().sum(),
        "rm/rejected_sum": rejected_scores.detach().sum(),
    }
    return loss, metrics


def pointwise_reward_loss(
    value_model: torch.nn.Module,
    batch: SequenceBatch,
    scores: torch.Tensor,
    baselines: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-completion squared error of the head's score against its target score.

    batch: N rows, one scored completion each; scores: [N] target scores; baselines: [N]
        per-prompt baselines b(x) (`core.pointwise.prompt_baselines`) or None.

    Returns (loss [N] to be averaged by the caller over the optimizer step, detached
    metric SUMS so that micro-batches add up: "rm/sq_err_sum", "rm/n", and the moments
    "rm/pred_sum", "rm/target_sum", "rm/pred_sq_sum", "rm/target_sq_sum", "rm/cross_sum"
    from which the Pearson correlation of predictions and targets is computed).
    """
    predictions = sequence_scores(value_model, batch)  # [N]
    loss, _ = pointwise_loss(predictions, scores.to(predictions.device), baselines)
    pred = predictions.detach()
    target = scores.to(pred) - (0.0 if baselines is None else baselines.to(pred))
    metrics = {
        "rm/sq_err_sum": loss.detach().sum(),
        "rm/n": torch.tensor(float(pred.numel())),
        "rm/pred_sum": pred.sum(),
        "rm/target_sum": target.sum(),
        "rm/pred_sq_sum": pred.pow(2).sum(),
        "rm/target_sq_sum": target.pow(2).sum(),
        "rm/cross_sum": (pred * target).sum(),
    }
    return loss, metrics
