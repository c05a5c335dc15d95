"""Scored data: `posttrain rm --algo.loss pointwise` and N-best lists for `posttrain dpo`.

A scored row is (prompt, completion, score) (`posttrain.data.datasets` kind "scored"; the
synthetic tasks give the solution score 1 and the wrong solution its partial credit).
The pointwise reward model regresses its scalar head onto the score, or onto the score
minus its prompt's mean score (`algo.baseline: prompt_mean`) — study guide §2.2,
"Pointwise Reward Models: predict scalar scores directly". See core/pointwise.py.

A ranked row is (prompt, K candidates, K scores or ranks) (kind "ranked"); `encode_ranked`
expands it into every pair it induces, each weighted by its score gap (case-studies seed
§6 "Multi-Preference & N-Best Generalization"), for the DPO-family losses. See
core/nbest.py.
"""

from __future__ import annotations

import math

import torch

from posttrain.algos.reward_model import pointwise_reward_loss
from posttrain.core.nbest import induced_pairs, pair_weights
from posttrain.core.pointwise import prompt_baselines
from posttrain.engines.encoding import encode_continuation
from posttrain.errors import ConfigError, DataError
from posttrain.train.offline.data import _text, encode_rows
from posttrain.train.offline.methods import RewardModelMethod, _device, _ratio, completion_batch


def encode_scored(rows: list[dict], tokenizer, data, source: str, *, baseline: str = "none") -> list[dict]:
    """Scored items {"prompt", "completion" (token ids, no EOS), "score", "baseline"}.

    No EOS is appended: like a Bradley–Terry RM, the head is read at the last completion
    token of the text as generated. baseline "prompt_mean": every item's baseline is the
    mean score of the rows sharing its (rendered) prompt, computed over `rows` only (train
    and held-out rows get their own means); "none": 0.
    """

    def read_row(i, row, where):
        if row.get("score") is None:
            raise DataError(f"{where}: column 'score' is missing")
        completion = _text(row.get("completion"), where, "completion")
        if not completion.strip():
            raise DataError(f"{where}: empty completion")
        return (
            row.get("prompt"),
            True,
            lambda: [
                {"completion": encode_continuation(tokenizer, completion), "score": float(row["score"])}
            ],
        )

    items = encode_rows(rows, tokenizer, data, source, read_row)
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


def encode_ranked(rows: list[dict], tokenizer, data, source: str) -> list[dict]:
    """Pair items {"prompt", "chosen", "rejected" (token ids, EOS appended), "margin": 0,
    "gap", "row"} from ranked rows: every pair with s_chosen > s_rejected
    (`core.nbest.induced_pairs`), in the row's candidate order. Weights are set by
    `weight_pairs` once the training pairs' mean gap is known.
    """
    eos = tokenizer.eos_token_id

    def read_row(i, row, where):
        def build():  # after the prompt is kept: candidates of a skipped row are not checked
            cands = [
                encode_continuation(tokenizer, _text(c, where, "completions")) + [eos]
                for c in row["completions"]
            ]
            chosen, rejected, gaps = induced_pairs(torch.tensor(row["scores"], dtype=torch.float64))
            return [
                {"chosen": cands[c], "rejected": cands[r], "margin": 0.0, "gap": g, "row": i}
                for c, r, g in zip(chosen.tolist(), rejected.tolist(), gaps.tolist())
            ]

        return row.get("prompt"), True, build

    return encode_rows(rows, tokenizer, data, source, read_row)


def weight_pairs(items: list[dict], mode: str, normalizer: float | None) -> list[dict]:
    """Set each N-best pair's "weight" (`core.nbest.pair_weights`); returns `items`."""
    gaps = torch.tensor([it["gap"] for it in items], dtype=torch.float64)
    for it, w in zip(items, pair_weights(gaps, mode, normalizer).tolist()):
        it["weight"] = w
    return items


def check_ranked(data, algo) -> bool:
    """Whether a `posttrain dpo` config reads ranked lists (data.format=ranked); a setting
    that needs the other format is a ConfigError."""
    ranked = data.format == "ranked"
    if ranked and data.pairs != "synthetic":
        raise ConfigError(
            f"data.format=ranked reads ranked lists (a file or the task); data.pairs={data.pairs} makes its own pairs"
        )
    if not ranked and algo.pair_weighting != "none":
        raise ConfigError(
            f"algo.pair_weighting={algo.pair_weighting} weights the pairs of ranked lists; set data.format=ranked"
        )
    return ranked


def ranked_items(split, tokenizer, data, weighting: str) -> tuple[list[dict], list[dict]]:
    """Induced, weighted pairs of a Split's train and held-out ranked rows.

    The gap normaliser is the mean gap of the TRAINING pairs, for both splits, so a
    held-out pair weighs what the same pair would weigh in training.
    """
    train = encode_ranked(split.train, tokenizer, data, split.source)
    held = encode_ranked(split.eval, tokenizer, data, split.source + " (eval)") if split.eval else []
    mean_gap = sum(it["gap"] for it in train) / len(train)
    return weight_pairs(train, weighting, mean_gap), weight_pairs(held, weighting, mean_gap) if held else []


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
