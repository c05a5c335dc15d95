"""Model-side scoring pieces shared by trainers, rewards and evaluation.

Shapes: B traces, S steps (padded), L sequence length, T completion tokens.

This module sits in engines/ so that both algos/ (training a PRM) and data/ (the "prm"
reward built from a YAML path) can use it: imports point down only
(core <- engines <- data <- algos <- train), and data/ must never import algos/.

* `render_prompt` (from engines/encoding.py): the text a model sees before its
  completion (chat template).
* `reward_model_ids`: the token layout of an outcome reward model's input.
* Process reward model layout: a stepwise completion is every step followed by a step
  separator, ``step_1 SEP step_2 SEP ... step_S SEP``, and the scalar head's logit at
  the LAST token of each separator is the step's score (it has seen the whole prefix
  y_≤t): σ(logit) = PRM(x, y_≤t) (Lightman et al. 2023; Math-Shepherd, Wang et al.
  2024, use the same placement). `build_step_batch` lays traces out, `step_logits`
  reads the head there, `score_steps` turns text into per-step probabilities and
  `load_prm` loads what `posttrain prm` saves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.engines.batching import SequenceBatch, build_sequences
from posttrain.engines.encoding import (
    encode_continuation,
    encode_prompt,
    encode_text,
    render_prompt,  # noqa: F401  (re-exported: algos.sft)
)
from posttrain.errors import DataError

# The synthetic tasks join reasoning steps with this (data/tasks/base.py re-exports it);
# it lives here because the PRM's scoring layout depends on it and engines/ cannot
# import data/.
STEP_SEPARATOR = "; "


def reward_model_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) an outcome reward model scores for one pair.

    The one layout of a reward-model input, shared by `posttrain rm` training
    (`train/offline_data.encode_pairs` with append_eos=False), the "reward_model" RL
    reward and `posttrain eval --scorer.orm`: the prompt as the policy saw it
    (`encode_text`: the tokenizer's BOS once), then the completion's tokens as generated,
    with no EOS; the score is the head's value at the last completion token.

    prompt: the prompt text with the chat template already applied when the run uses one.
    """
    return encode_text(tokenizer, prompt), encode_continuation(tokenizer, completion)


@dataclass
class StepBatch:
    """A batch of stepwise traces.

    seqs: the token layout (prompts left-padded, completions right-padded).
    step_index: [B, S] long, column in the completion (0-based, add seqs.response_start
        for the input column) of the separator token ending each step; 0 where padded.
    labels: [B, S] float, 1.0 for a correct step, 0.0 for a wrong one (0 where padded).
    step_mask: [B, S] float, 1 where the step exists.
    """

    seqs: SequenceBatch
    step_index: torch.Tensor
    labels: torch.Tensor
    step_mask: torch.Tensor

    def __len__(self) -> int:
        return self.step_index.shape[0]

    def to(self, device) -> StepBatch:
        """The same batch with every tensor on `device`."""
        return StepBatch(
            self.seqs.to(device),
            self.step_index.to(device),
            self.labels.to(device),
            self.step_mask.to(device),
        )


def build_step_batch(
    prompt_ids: list[list[int]],
    step_ids: list[list[list[int]]],
    labels: list[list[bool]] | None,
    *,
    separator_ids: list[int],
    pad_id: int,
) -> StepBatch:
    """Lay out B traces: completion_b = concat(step + separator for each step).

    prompt_ids: B prompt token lists (chat template already applied).
    step_ids: B lists of S_b token lists, one per step (no separator inside).
    labels: B lists of S_b booleans, or None when only scoring.
    separator_ids: the separator's tokens; the LAST one is where a step is scored.
    """
    if not separator_ids:
        raise DataError("PRM step separator tokenizes to nothing; choose a non-empty prm.step_separator")
    completions: list[list[int]] = []
    ends: list[list[int]] = []
    for b, steps in enumerate(step_ids):
        if not steps:
            raise DataError(f"trace {b}: no steps")
        if labels is not None and len(labels[b]) != len(steps):
            raise DataError(f"trace {b}: {len(steps)} steps but {len(labels[b])} labels")
        ids: list[int] = []
        end: list[int] = []
        for step in steps:
            ids.extend(step)
            ids.extend(separator_ids)
            end.append(len(ids) - 1)
        completions.append(ids)
        ends.append(end)
    B, S = len(completions), max(len(e) for e in ends)
    T = max(len(c) for c in completions)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    step_index = torch.zeros((B, S), dtype=torch.long)
    label_t = torch.zeros((B, S), dtype=torch.float32)
    step_mask = torch.zeros((B, S), dtype=torch.float32)
    for b, (ids, end) in enumerate(zip(completions, ends)):
        response_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[b, : len(ids)] = 1.0
        step_index[b, : len(end)] = torch.tensor(end, dtype=torch.long)
        step_mask[b, : len(end)] = 1.0
        if labels is not None:
            label_t[b, : len(end)] = torch.tensor([float(x) for x in labels[b]])
    seqs = build_sequences(prompt_ids, response_ids, response_mask, pad_id)
    return StepBatch(seqs=seqs, step_index=step_index, labels=label_t, step_mask=step_mask)


def step_logits(value_model: torch.nn.Module, batch: StepBatch) -> torch.Tensor:
    """Head logit at each step's separator token: [B, S] (garbage where step_mask is 0)."""
    s = batch.seqs
    values = value_model(
        input_ids=s.input_ids, attention_mask=s.attention_mask, position_ids=s.position_ids
    )  # [B, L]
    cols = (batch.step_index + s.response_start).to(values.device)  # [B, S]
    return values.gather(1, cols).float()


@torch.no_grad()
def score_steps(
    prm_model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    step_lists: Sequence[Sequence[str]],
    *,
    step_separator: str = STEP_SEPARATOR,
    apply_chat_template: bool = False,
    enable_thinking: bool = True,
    batch_size: int = 16,
) -> list[list[float]]:
    """Per-step scores PRM(x, y_≤t) ∈ (0, 1) for each trace, as plain floats.

    prm_model: a trained PRM (`ScalarHeadModel`, e.g. from `load_prm`).
    prompts: B prompts exactly as the policy saw them (chat template already applied,
        the rollout convention); with apply_chat_template=True they are raw user
        messages and get rendered as during PRM training (thinking mode on).
    step_lists: B lists of step strings (without separators).
    step_separator: must be the separator the PRM was trained with (the tasks'
        STEP_SEPARATOR "; " by default; `posttrain prm` saves it in final/prm.json).

    Used by the "prm" reward (aggregates, marginals r_t = s_t − s_{t−1}) and PRM
    best-of-N (min or last step score). An empty step list gives an empty score list.
    """
    if len(prompts) != len(step_lists):
        raise DataError(f"score_steps: {len(prompts)} prompts but {len(step_lists)} step lists")
    was_training = prm_model.training
    prm_model.eval()
    pad_id = tokenizer.pad_token_id
    sep_ids = encode_continuation(tokenizer, step_separator)
    device = next(prm_model.parameters()).device
    out: list[list[float]] = [[] for _ in prompts]
    todo = [i for i, steps in enumerate(step_lists) if len(steps) > 0]
    try:
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            p_ids = [
                encode_prompt(
                    tokenizer, prompts[i], chat_template=apply_chat_template, enable_thinking=enable_thinking
                )
                for i in idx
            ]
            s_ids = [[encode_continuation(tokenizer, s) for s in step_lists[i]] for i in idx]
            batch = build_step_batch(p_ids, s_ids, None, separator_ids=sep_ids, pad_id=pad_id).to(device)
            probs = torch.sigmoid(step_logits(prm_model, batch)).cpu()  # [b, S]
            for row, i in enumerate(idx):
                out[i] = probs[row, : len(step_lists[i])].tolist()
    finally:
        prm_model.train(was_training)
    return out


def load_prm(path: str, *, device: str = "cpu") -> tuple[torch.nn.Module, str]:
    """Load a PRM written by `posttrain prm` (run_dir/final): (model in eval mode, separator).

    The separator comes from the prm.json saved next to the weights; a directory without
    one (e.g. a PRM trained elsewhere) falls back to the tasks' STEP_SEPARATOR.
    """
    from posttrain.engines.models import build_value_model

    model = build_value_model(str(path), device=device).eval()
    meta = os.path.join(str(path), "prm.json")
    separator = STEP_SEPARATOR
    if os.path.isfile(meta):
        with open(meta) as fh:
            separator = json.load(fh).get("step_separator", STEP_SEPARATOR)
    return model, separator
