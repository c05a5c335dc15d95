"""Rewards from trained models: an outcome reward model and a process reward model (PRM)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from posttrain.data.rewards.text import with_open_think
from posttrain.data.tasks.base import STEP_SEPARATOR
from posttrain.engines.scoring import reward_model_ids
from posttrain.errors import ConfigError, ModelError, RewardError

# ---------------------------------------------------------------------------- reward model


def _load_with_tokenizer(what: str, path: str, load: Callable):
    """(load(), the tokenizer saved at `path`); a loading failure is one ModelError line."""
    from posttrain.engines.models import load_tokenizer  # same tokenizer loading as the trainers

    try:
        return load(), load_tokenizer(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {what} {path!r}: {str(e).splitlines()[0]}") from None


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
    AutoModelForSequenceClassification loads (what `posttrain rm` saves). The ids scored
    are `posttrain.engines.scoring.reward_model_ids` of (prompt, completion), the layout
    `posttrain rm` trains on (prompts already chat-templated by the caller: the RL loop
    passes them in `model_prompt`; the completion exactly as generated, no EOS).
    batch_size: sequences per forward; no grad, eval mode. max_length: longer inputs keep
    their last max_length tokens (the end, where the score is read).
    """
    if model is None:
        if model_path is None:
            raise ConfigError("reward_model needs model= (+ tokenizer=) or model_path=")
        from transformers import AutoModelForSequenceClassification

        from posttrain.engines.models import NO_HUB_KERNELS

        model, saved_tokenizer = _load_with_tokenizer(
            "reward model",
            model_path,
            lambda: AutoModelForSequenceClassification.from_pretrained(model_path, **NO_HUB_KERNELS),
        )
        tokenizer = tokenizer or saved_tokenizer
    if tokenizer is None:
        raise ConfigError("reward_model needs a tokenizer with an in-memory model")
    if device is not None:
        model = model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lock = threading.Lock()  # one forward at a time per model

    def fn(prompts, completions, model_prompt=None, **columns):
        # The RL loop passes the prompt as the policy saw it (chat template applied) in the
        # `model_prompt` column: the layout `posttrain rm` trains on.
        prompts = model_prompt if model_prompt is not None else prompts
        ids = []
        for p, c in zip(prompts, completions):
            p_ids, c_ids = reward_model_ids(tokenizer, p if isinstance(p, str) else "", c)
            ids.append((p_ids + c_ids)[-max_length:] if max_length else p_ids + c_ids)
        out: list[float] = []
        dev = next(model.parameters()).device
        with lock, torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                for s in range(0, len(ids), batch_size):
                    chunk = ids[s : s + batch_size]
                    width = max(len(x) for x in chunk)
                    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for r, x in enumerate(chunk):  # right padding
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
    return [text for text, _ in step_spans(prompt, completion, separator)]


def step_spans(prompt, completion: str, separator: str = STEP_SEPARATOR) -> list[tuple[str, int]]:
    """(step text, end offset) per reasoning step, the steps of `split_steps`.

    end offset: the index in `completion` (its own characters, not the text with a
    template-opened ``<think>`` put back) just past the step's last non-space character,
    so ``completion[:end]`` is the prefix the step closes. Dense PRM rewards land on the
    token holding character end − 1.
    """
    text = with_open_think(prompt, completion)
    shift = len(text) - len(completion)  # with_open_think only ever prepends "<think>"
    start, stop = 0, len(text)
    if "<think>" in text:  # the same block think_text reads: first <think> to the next </think>
        start = text.index("<think>") + len("<think>")
        close = text.find("</think>", start)
        stop = close if close >= 0 else len(text)
    out = []
    pos = start
    for piece in text[start:stop].split(separator):
        step = piece.strip()
        if step:
            end = pos + (len(piece) - len(piece.lstrip())) + len(step)
            out.append((step, end - shift))
        pos += len(piece) + len(separator)
    return out


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
    model_path: str | None = None,
    model=None,
    tokenizer=None,
    scorer: Callable[[list, list[list[str]]], list[list[float]]] | None = None,
    aggregate: str | None = None,
    step_separator: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dense: bool = False,
) -> Callable:
    """Sequence reward from a process reward model: aggregate its per-step scores.

    Give exactly one source of step scores:
    model_path: a PRM saved by `posttrain prm` (run_dir/final: weights, tokenizer and
        prm.json with its step separator), so a YAML config can say
        ``{name: prm, options: {model_path: runs/prm/final, aggregate: min}}``;
    model + tokenizer: a PRM in memory (`posttrain.engines.scoring.score_steps` scores it);
    scorer: any (prompts, step_lists) -> per-step scores PRM(x, y≤t) ∈ [0, 1].
    aggregate: "min" (a trace is as good as its worst step; Lightman et al. 2023 best-of-N,
        the default), "mean", or "last" (the PRM's view of the whole trace).
    step_separator: how the completion's <think> text is split into steps; default the
        separator the PRM was trained with (prm.json), else the tasks' "; ".
    batch_size / device: traces per PRM forward (no grad, eval mode) and where it runs.
    dense: mark the reward as dense (``fn.dense``): the RL loop then gives each step's
        marginal r_t = PRM(x, y≤t) − PRM(x, y≤t−1) at the token that ends the step instead
        of a sequence score, so `aggregate` does not apply and is refused.

    Prompts are scored exactly as given; `posttrain prm` trains on chat-templated ones,
    which the RL loop passes to a dense prm (the outcome reward gets the raw prompt text,
    as every reward does). None for completions without steps. The per-step
    marginals for dense rewards come from `prm_step_marginals` on the same scores
    (`fn.step_scores(prompts, completions)`); `fn.scored_steps(prompts, completions)`
    gives, per completion, the scores and each step's end offset (see `step_spans`);
    `fn.step_separator` is the separator it splits on.
    """
    if not isinstance(dense, bool):
        raise ConfigError(f"prm reward: dense must be true or false, got {dense!r}")
    if dense and aggregate is not None:
        raise ConfigError(
            "prm reward: aggregate does not apply with dense=true (each step is its own reward)"
        )
    aggregate = aggregate or "min"
    if aggregate not in _AGGREGATES:
        raise ConfigError(f"prm aggregate must be one of {', '.join(_AGGREGATES)}, got {aggregate!r}")
    given = [
        name
        for name, v in (("model_path", model_path), ("model", model), ("scorer", scorer))
        if v is not None
    ]
    if len(given) != 1:
        raise ConfigError(
            f"prm reward needs exactly one of model_path, model (+ tokenizer) or scorer, got {given or 'none'}"
        )
    agg = _AGGREGATES[aggregate]
    if scorer is None:
        scorer, trained_separator = _prm_scorer(
            model_path, model, tokenizer, batch_size, device, step_separator or STEP_SEPARATOR
        )
        step_separator = step_separator or trained_separator
    step_separator = step_separator or STEP_SEPARATOR

    def scored_steps(prompts, completions) -> tuple[list[list[float]], list[list[int]]]:
        spans = [step_spans(p, c, step_separator) for p, c in zip(prompts, completions)]
        steps = [[text for text, _ in sp] for sp in spans]
        scores = scorer(list(prompts), steps)
        if len(scores) != len(steps) or any(len(s) != len(t) for s, t in zip(scores, steps)):
            raise RewardError("prm scorer returned a score list that does not match the steps")
        return [list(map(float, s)) for s in scores], [[end for _, end in sp] for sp in spans]

    def step_scores(prompts, completions) -> list[list[float]]:
        return scored_steps(prompts, completions)[0]

    def fn(prompts, completions, model_prompt=None, **columns):
        # `model_prompt` (RL loop): the templated prompt, the layout `posttrain prm` trains on.
        prompts = model_prompt if model_prompt is not None else prompts
        return [agg(s) if s else None for s in step_scores(prompts, completions)]

    fn.step_scores = step_scores
    fn.scored_steps = scored_steps
    fn.step_separator = step_separator
    fn.dense = dense
    return fn


def _prm_scorer(
    model_path, model, tokenizer, batch_size: int, device, fallback_separator: str
) -> tuple[Callable, str]:
    """(scorer, the separator the PRM was trained with) for a saved or in-memory PRM.

    The scorer lays steps out with the trained separator (prm.json) whatever separator
    the completions are split on: the PRM only knows its own layout. An in-memory model
    has no prm.json and uses `fallback_separator`.
    """
    from posttrain.engines.scoring import load_prm, score_steps

    separator = fallback_separator
    if model_path is not None:
        (model, separator), tokenizer = _load_with_tokenizer(
            "PRM", model_path, lambda: load_prm(str(model_path), device=device or "cpu")
        )
    elif tokenizer is None:
        raise ConfigError("prm reward needs a tokenizer with an in-memory model")
    elif device is not None:
        model = model.to(device)
    lock = threading.Lock()  # one forward at a time per model (rewards run in threads)

    def scorer(prompts, step_lists):
        with lock:
            return score_steps(
                model, tokenizer, prompts, step_lists, step_separator=separator, batch_size=batch_size
            )

    return scorer, separator
