"""Rewards from trained models: an outcome reward model and a process reward model (PRM)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from posttrain.data.rewards.text import think_text, with_open_think
from posttrain.data.tasks.base import STEP_SEPARATOR
from posttrain.errors import ConfigError, ModelError, RewardError

# ---------------------------------------------------------------------------- reward model


def _last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score per sequence [B] from any scalar-head model: a ScalarHeadModel-like object with
    `sequence_scores`, a HF *ForSequenceClassification (logits [B, 1]), or a module that
    returns per-position values [B, L] (then the value at the last attended token)."""
    if hasattr(model, "sequence_scores"):
        return model.sequence_scores(input_ids, attention_mask).float()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)  # [B]
    pos_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos_ids)
    out = getattr(out, "logits", out)
    if out.dim() == 3 and out.shape[-1] == 1:
        out = out.squeeze(-1)
    if out.dim() == 2 and out.shape[1] == 1:
        return out[:, 0].float()
    if out.dim() == 2 and out.shape[1] == input_ids.shape[1]:
        return out.gather(1, last[:, None]).squeeze(1).float()  # [B]
    if out.dim() == 1:
        return out.float()
    raise ModelError(
        f"reward model output of shape {tuple(out.shape)} is not a score per sequence or position"
    )


def reward_model_reward(
    *,
    model=None,
    tokenizer=None,
    model_path: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str | torch.device | None = None,
) -> Callable:
    """Score prompt+completion with a trained scalar reward model (Bradley–Terry RM,
    InstructGPT / Ouyang et al. 2022: the head's value at the last real token).

    Give an in-memory `model` + `tokenizer`, or `model_path` to a checkpoint that
    AutoModelForSequenceClassification loads (what `posttrain rm` saves). The text scored
    is prompt + completion as strings (prompts already chat-templated by the caller).
    batch_size: sequences per forward; no grad, eval mode. max_length: longer inputs keep
    their last max_length tokens (the end, where the score is read).
    """
    if model is None:
        if model_path is None:
            raise ConfigError("reward_model needs model= (+ tokenizer=) or model_path=")
        from transformers import AutoModelForSequenceClassification

        from posttrain.engines.models import load_tokenizer  # same tokenizer loading as the trainers

        try:
            model = AutoModelForSequenceClassification.from_pretrained(model_path)
            tokenizer = tokenizer or load_tokenizer(model_path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load reward model {model_path!r}: {str(e).splitlines()[0]}") from None
    if tokenizer is None:
        raise ConfigError("reward_model needs a tokenizer with an in-memory model")
    if device is not None:
        model = model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lock = threading.Lock()  # one forward at a time per model

    def fn(prompts, completions, **columns):
        texts = [with_open_think(p, c) if isinstance(p, str) else c for p, c in zip(prompts, completions)]
        texts = [(p if isinstance(p, str) else "") + t for p, t in zip(prompts, texts)]
        out: list[float] = []
        dev = next(model.parameters()).device
        with lock, torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                for s in range(0, len(texts), batch_size):
                    ids = [
                        tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[s : s + batch_size]
                    ]
                    if max_length:
                        ids = [x[-max_length:] for x in ids]
                    width = max(len(x) for x in ids)
                    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
                    for r, x in enumerate(ids):  # right padding
                        input_ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
                        attention_mask[r, : len(x)] = 1
                    scores = _last_token_scores(model, input_ids.to(dev), attention_mask.to(dev))  # [b]
                    out.extend(scores.cpu().tolist())
            finally:
                model.train(was_training)
        return out

    return fn


# ---------------------------------------------------------------------------- PRM


def split_steps(prompt, completion: str, separator: str = STEP_SEPARATOR) -> list[str]:
    """The reasoning steps of a completion: its <think> text split on `separator`
    (empty steps dropped). The tasks join steps with STEP_SEPARATOR ("; ")."""
    return [s for s in (x.strip() for x in think_text(prompt, completion).split(separator)) if s]


def prm_step_marginals(step_scores: Sequence[float], initial: float = 0.0) -> list[float]:
    """Per-step process rewards r_t = PRM(x, y≤t) − PRM(x, y≤t−1), with PRM(x, y≤0) =
    `initial` (the seed note's marginal-contribution form). They telescope:
    Σ_t r_t = s_T − initial."""
    prev = initial
    out = []
    for s in step_scores:
        out.append(float(s) - prev)
        prev = float(s)
    return out


_AGGREGATES = {
    "min": min,
    "mean": lambda xs: sum(xs) / len(xs),
    "last": lambda xs: xs[-1],
}


def prm_reward(
    *,
    scorer: Callable[[list, list[list[str]]], list[list[float]]],
    aggregate: str = "min",
    step_separator: str = STEP_SEPARATOR,
) -> Callable:
    """Sequence reward from a process reward model: aggregate its per-step scores.

    scorer: (prompts, step_lists) -> per-step scores PRM(x, y≤t) ∈ [0, 1], e.g.
        ``functools.partial(posttrain.algos.prm.score_steps, prm_model, tokenizer)`` (the
        trainer builds it: data/ does not import algos/).
    aggregate: "min" (a trace is as good as its worst step; Lightman et al. 2023 best-of-N),
        "mean", or "last" (the PRM's view of the whole trace).
    None for completions without steps. The per-step marginals for dense rewards come from
    `prm_step_marginals` on the same scores (`fn.step_scores(prompts, completions)`).
    """
    if aggregate not in _AGGREGATES:
        raise ConfigError(f"prm aggregate must be one of {', '.join(_AGGREGATES)}, got {aggregate!r}")
    agg = _AGGREGATES[aggregate]

    def step_scores(prompts, completions) -> list[list[float]]:
        steps = [split_steps(p, c, step_separator) for p, c in zip(prompts, completions)]
        scores = scorer(list(prompts), steps)
        if len(scores) != len(steps) or any(len(s) != len(t) for s, t in zip(scores, steps)):
            raise RewardError("prm scorer returned a score list that does not match the steps")
        return [list(map(float, s)) for s in scores]

    def fn(prompts, completions, **columns):
        return [agg(s) if s else None for s in step_scores(prompts, completions)]

    fn.step_scores = step_scores
    return fn
