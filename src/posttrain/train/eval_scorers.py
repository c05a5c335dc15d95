"""Best-of-N scorers of `posttrain eval`: an outcome reward model and a process reward
model score every sampled completion, in the input layout those models were trained on
(`posttrain.engines.scoring.reward_model_ids`, `score_steps`). Re-exported by
train/evaluate.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# --------------------------------------------------------------------------- scorers


def orm_scores(
    path: str,
    prompts: Sequence[str],
    texts: Sequence[Sequence[str]],
    *,
    device: str = "cpu",
    chat_template: bool = True,
    enable_thinking: bool = True,
    batch_size: int = 16,
) -> list[list[float]]:
    """Outcome reward-model score of every completion: [P][k] floats.

    Each pair is laid out by `posttrain.engines.scoring.reward_model_ids`, the layout of
    RM training and of the "reward_model" RL reward (templated prompt + completion tokens,
    no EOS, scored at the last completion token), with the reward model's own tokenizer.
    """
    import torch

    from posttrain.algos.reward_model import sequence_scores
    from posttrain.engines.batching import build_sequences
    from posttrain.engines.encoding import prompt_text
    from posttrain.engines.models import build_value_model, load_tokenizer
    from posttrain.engines.scoring import reward_model_ids

    tok = load_tokenizer(path)
    rm = build_value_model(path, device=device).eval()
    flat = [(p, t) for p, ts in zip(prompts, texts) for t in ts]
    out: list[float] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        pairs = [
            reward_model_ids(
                tok, prompt_text(tok, p, chat_template=chat_template, enable_thinking=enable_thinking), t
            )
            for p, t in chunk
        ]
        p_ids, r_ids = [p for p, _ in pairs], [r for _, r in pairs]
        width = max(len(r) for r in r_ids)
        resp = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width)
        for i, r in enumerate(r_ids):
            resp[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1.0
        batch = build_sequences(p_ids, resp, mask, tok.pad_token_id)
        batch = batch.to(device)
        with torch.no_grad():
            out.extend(sequence_scores(rm, batch).cpu().tolist())
    k = len(texts[0]) if texts else 0
    return [out[i * k : (i + 1) * k] for i in range(len(prompts))]


def prm_scores(
    path: str,
    prompts: Sequence[str],
    texts: Sequence[Sequence[str]],
    *,
    aggregate: str = "min",
    device: str = "cpu",
    chat_template: bool = True,
    enable_thinking: bool = True,
) -> list[list[float]]:
    """PRM trace score of every completion: [P][k]; steps are the think block split on the
    PRM's step separator, aggregated by min / last / mean / prod. No steps -> NaN.

    Prompts are rendered as the policy saw them (chat template when `chat_template`), the
    layout `posttrain prm` trains on and the "prm" RL reward scores; a <think> opened by
    the template counts as the completion's own (`with_open_think`)."""
    from posttrain.algos.prm import load_prm, score_steps
    from posttrain.data.rewards.text import with_open_think
    from posttrain.engines.encoding import prompt_text
    from posttrain.engines.models import load_tokenizer

    model, sep = load_prm(path, device=device)
    tok = load_tokenizer(path)
    flat_p, flat_steps = [], []
    for p, ts in zip(prompts, texts):
        rendered = prompt_text(tok, p, chat_template=chat_template, enable_thinking=enable_thinking)
        for t in ts:
            m = _THINK_BODY.search(with_open_think(rendered, t))
            body = m.group(1) if m else ""
            flat_p.append(rendered)
            flat_steps.append([s.strip() for s in body.split(sep) if s.strip()])
    step_scores = score_steps(model, tok, flat_p, flat_steps, step_separator=sep)
    agg = {"min": min, "last": lambda s: s[-1], "mean": lambda s: sum(s) / len(s), "prod": math.prod}[
        aggregate
    ]
    flat = [agg(s) if s else float("nan") for s in step_scores]
    k = len(texts[0]) if texts else 0
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


_THINK_BODY = re.compile(r"<think>(.*?)</think>", re.S)
