"""Kimi k1.5's long-to-short methods besides length-penalised RL: rows -> rows, and merging.

The GRPO seed's "Long2Short RL" section (grpo-kl-estimators note, "Kimi k1.5 Technical
Points"): "Long CoT model as teacher; train short CoT student; goal: both correct and
concise". Kimi k1.5 (§2.4 "Long2short") gives four ways; the RL one is
recipes/long_to_short/2_rl_short.yaml, the other three live here and are stages of the
same pipeline:

* shortest rejection sampling — sample the long model k times per prompt, keep the
  SHORTEST correct sample of each prompt, fine-tune on those (`shortest_per_prompt`,
  `posttrain sft --data.keep_if correct --data.keep_shortest true`);
* long-vs-short preference pairs for DPO — the shortest correct sample is chosen, and a
  wrong sample longer than it, or a correct one at least `long_ratio` (1.5) times as
  long, is rejected (`long_short_pairs`, `posttrain dpo --data.pairs long_short`);
* model merging — average the weights of the long-CoT model and a short one
  (`merge_state_dicts`, `posttrain merge`).

Sample rows are `posttrain eval`'s samples.jsonl: prompt, completion, correct (bool) and
length (completion tokens); a row without `length` is measured in characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.train.config.checks import setting


def _length(row: dict) -> float:
    """Completion length: the `length` column (tokens, from posttrain eval), else characters."""
    value = row.get("length")
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else len(row["completion"])
    )


def _by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["prompt"], sort_keys=True), []).append(row)
    return groups


def _correct(row: dict, where: str) -> bool:
    value = row.get("correct")
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise DataError(
            f"{where}: column 'correct' must be true/false (posttrain eval's samples.jsonl), got {value!r}"
        )
    return bool(value)


def shortest_per_prompt(rows: list[dict], source: str) -> list[dict]:
    """Each prompt's shortest row (first one on ties), in first-appearance order.

    Used after data.keep_if=correct, this is Kimi's shortest rejection sampling: of a
    prompt's correct samples only the shortest is fine-tuned on.
    """
    if not rows:
        raise DataError(f"{source}: no rows to pick the shortest from")
    return [min(group, key=_length) for group in _by_prompt(rows).values()]


def long_short_pairs(rows: list[dict], source: str, *, long_ratio: float, max_pairs: int) -> list[dict]:
    """Preference rows {prompt, chosen, rejected, answer?} from sampled completions.

    Per prompt: chosen = the shortest correct sample (length L); rejected = each sample
    that is wrong and longer than L, or correct and at least long_ratio·L long — longest
    first, at most `max_pairs`, distinct texts only. Prompts without a correct sample or
    without such a longer one give no pair. Kimi k1.5 §2.4: "the shortest correct
    solution as the positive sample while longer responses are treated as negative
    samples, including wrong longer responses and correct longer responses (1.5 times
    longer than the chosen positive sample)".
    """
    if long_ratio < 1.0 or max_pairs < 1:
        raise ConfigError(
            f"long_short pairs need long_ratio >= 1 and pairs_per_prompt >= 1, got {long_ratio}, {max_pairs}"
        )
    out = []
    for i, row in enumerate(rows):
        _correct(row, f"{source} row {i + 1}")
    for group in _by_prompt(rows).values():
        good = [r for r in group if r["correct"]]
        if not good:
            continue
        chosen = min(good, key=_length)
        shortest = _length(chosen)
        longer = [r for r in group if r["completion"] != chosen["completion"]
                  and (_length(r) >= long_ratio * shortest if r["correct"] else _length(r) > shortest)]  # fmt: skip
        texts: list[str] = []
        for r in sorted(longer, key=_length, reverse=True):
            if r["completion"] not in texts:
                texts.append(r["completion"])
        extra = {"answer": chosen["answer"]} if "answer" in chosen else {}
        out += [{"prompt": chosen["prompt"], "chosen": chosen["completion"], "rejected": t, **extra}
                for t in texts[:max_pairs]]  # fmt: skip
    if not out:
        raise DataError(
            f"{source}: no long-vs-short pair: no prompt has a correct sample and a longer wrong one "
            f"(or a correct one >= {long_ratio:g}x as long); sample more per prompt"
        )
    return out


def merge_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i θ_i over models with identical parameter names and shapes.

    weights: one non-negative weight per model, normalised to sum to 1 (weight averaging).
    Floating tensors are averaged in float32 and cast back; integer buffers must agree.
    """
    if len(states) < 2 or len(weights) != len(states):
        raise ConfigError(
            f"merge needs >= 2 models and one weight each, got {len(states)} and {len(weights)}"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"merge weights must be >= 0 with a positive sum, got {weights}")
    total = float(sum(weights))
    norm = [w / total for w in weights]
    keys = list(states[0])
    for j, state in enumerate(states[1:], start=2):
        if set(state) != set(keys):
            diff = sorted(set(state) ^ set(keys))[:3]
            raise ConfigError(f"merge: model {j} has different parameters than model 1 (e.g. {diff})")
    merged = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ConfigError(
                f"merge: {key} has shapes {[tuple(t.shape) for t in tensors]}; the models differ"
            )
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ConfigError(f"merge: non-float tensor {key} differs between the models")
            merged[key] = tensors[0].clone()
            continue
        acc = sum(w * t.float() for w, t in zip(norm, tensors))
        merged[key] = acc.to(tensors[0].dtype)
    return merged


# --------------------------------------------------------------------------- posttrain merge


@dataclass
class MergeConfig:
    """Weight averaging of causal LMs with one architecture (posttrain merge; Kimi long2short)."""

    models: list[str] = setting(
        list, "Model directories (>= 2, same architecture and tokenizer).", factory=True
    )
    weights: list[float] | None = setting(
        None, "One weight per model, normalised to sum 1; null = equal weights."
    )
    output_dir: str = setting("runs/merge", "The merged model goes to output_dir/final.")


def run_merge(cfg: MergeConfig) -> dict[str, Any]:
    """Load every model, average their weights, save output_dir/final (model + first tokenizer)."""
    from pathlib import Path

    from posttrain.engines.models import load_model, load_tokenizer, save_model

    weights = cfg.weights if cfg.weights is not None else [1.0] * len(cfg.models)
    if len(cfg.models) < 2:
        raise ConfigError(f"models: give at least two model directories, got {cfg.models}")
    models = [load_model(path) for path in cfg.models]
    merged = merge_state_dicts([m.state_dict() for m in models], weights)
    models[0].load_state_dict(merged)
    out = Path(cfg.output_dir) / "final"
    save_model(models[0], load_tokenizer(cfg.models[0]), str(out))
    total = sum(weights)
    return {"models": list(cfg.models), "weights": [w / total for w in weights], "final_model": str(out)}


def plan(cfg: MergeConfig) -> str:
    """Dry-run description of a merge."""
    weights = cfg.weights if cfg.weights is not None else [1.0] * len(cfg.models)
    total = sum(weights) or 1.0
    parts = [f"{w / total:.3g} x {m}" for w, m in zip(weights, cfg.models)]
    return (
        f"posttrain merge\n  theta = {' + '.join(parts) or '(no models)'}\n  output: {cfg.output_dir}/final"
    )
