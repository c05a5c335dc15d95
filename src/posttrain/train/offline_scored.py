"""Scored data for `posttrain rm --algo.loss pointwise`: rows -> items, and the method.

A scored row is (prompt, completion, score) (`posttrain.data.datasets` kind "scored"; the
synthetic tasks give the solution score 1 and the wrong solution its partial credit).
The pointwise reward model regresses its scalar head onto the score, or onto the score
minus its prompt's mean score (`algo.baseline: prompt_mean`) — study guide §2.2,
"Pointwise Reward Models: predict scalar scores directly". See core/pointwise.py.
"""

from __future__ import annotations

import math

import torch

from posttrain.algos.reward_model import pointwise_reward_loss
from posttrain.core.pointwise import prompt_baselines
from posttrain.errors import DataError
from posttrain.train.offline_data import _ids, _text, encode_prompt
from posttrain.train.offline_methods import RewardModelMethod, _device, _eval_sums, _ratio, completion_batch


def encode_scored(rows: list[dict], tokenizer, data, source: str, *, baseline: str = "none") -> list[dict]:
    """Scored items {"prompt", "completion" (token ids, no EOS), "score", "baseline"}.

    No EOS is appended: like a Bradley–Terry RM, the head is read at the last completion
    token of the text as generated. baseline "prompt_mean": every item's baseline is the
    mean score of the rows sharing its (rendered) prompt, computed over `rows` only (train
    and held-out rows get their own means); "none": 0.
    """
    items = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        if row.get("score") is None:
            raise DataError(f"{where}: column 'score' is missing")
        completion = _text(row.get("completion"), where, "completion")
        if not completion.strip():
            raise DataError(f"{where}: empty completion")
        p = encode_prompt(tokenizer, row.get("prompt"), where, data)
        if p is None:
            continue
        items.append({"prompt": p, "completion": _ids(tokenizer, completion), "score": float(row["score"])})
    if not items:
        raise DataError(f"{source}: no usable rows")
    scores = torch.tensor([it["score"] for it in items], dtype=torch.float64)
    if baseline == "prompt_mean":
        groups: dict[tuple[int, ...], int] = {}
        group_id = torch.tensor([groups.setdefault(tuple(it["prompt"]), len(groups)) for it in items])
        means = prompt_baselines(scores, group_id).tolist()
    else:
        means = [0.0] * len(items)
    for it, b in zip(items, means):
        it["baseline"] = b
    return items


def pearson(sums: dict[str, float]) -> float:
    """Pearson correlation of predictions and targets from the summed moments of
    `pointwise_reward_loss`; NaN when either side has no variance."""
    n = sums["rm/n"]
    if not n:
        return float("nan")
    mp, mt = sums["rm/pred_sum"] / n, sums["rm/target_sum"] / n
    cov = sums["rm/cross_sum"] / n - mp * mt
    var = (sums["rm/pred_sq_sum"] / n - mp * mp) * (sums["rm/target_sq_sum"] / n - mt * mt)
    return cov / math.sqrt(var) if var > 0 else float("nan")


class PointwiseRewardMethod(RewardModelMethod):
    """Pointwise reward model: MSE of the scalar head against scores (core/pointwise.py).

    Same model, read-out and Hugging Face export as the Bradley–Terry method; items are
    single scored completions instead of pairs.
    """

    def step_counts(self, items):
        return {"num_rows": len(items)}

    def loss(self, items, counts):
        model = self.models["reward_model"]
        dev = _device(model)
        batch = completion_batch(
            [it["prompt"] for it in items], [it["completion"] for it in items], self.pad_id, dev
        )
        scores = torch.tensor([it["score"] for it in items], dtype=torch.float32, device=dev)
        baselines = torch.tensor([it["baseline"] for it in items], dtype=torch.float32, device=dev)
        loss, metrics = pointwise_reward_loss(model, batch, scores, baselines)
        return loss.sum() / counts["num_rows"], metrics

    def summarize(self, sums, prefix="rm"):
        return {
            f"{prefix}/mse": _ratio(sums["rm/sq_err_sum"], sums["rm/n"]),
            f"{prefix}/pearson": pearson(sums),
        }

    def evaluate(self):
        self.models["reward_model"].eval()
        loss, sums = _eval_sums(self, self.eval_items)
        out = {"eval/loss": loss}
        if sums:
            out.update(self.summarize(sums, prefix="eval/rm"))
        return out
