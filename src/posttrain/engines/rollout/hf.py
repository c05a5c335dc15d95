"""The hf rollout engine: `transformers` generate, for any causal LM architecture.

Sampling log-probs come from generate's *processed* scores (after temperature, top-k and
top-p, with -inf outside the kept support), so ``log_softmax(score)[token]`` is exactly
the renormalised sampling distribution of the Rollout contract; for greedy decoding the
scores are the raw logits (τ = 1), as in the native engine.

Finish reasons, stop strings and repetition are decided by the same `FinishTracker` the
native engine uses, replayed over the generated tokens; generate is additionally given
stopping criteria so it does not keep computing finished rows' tails when all are done.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import (
    LENGTH,
    RUNNING,
    FinishTracker,
    assemble_rollout,
    eos_ids,
    generate_in_eval_mode,
    repetition_hit,
)


class _RepetitionCriteria(StoppingCriteria):
    """Per-row stop for generations caught in an n-gram loop (Kimi k1.5 early stop)."""

    def __init__(self, prompt_len: int, ngram: int, max_repeats: int):
        self.prompt_len, self.ngram, self.max_repeats = prompt_len, ngram, max_repeats

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return repetition_hit(input_ids[:, self.prompt_len :], self.ngram, self.max_repeats)


class HFEngine:
    """Rollouts through `model.generate` (any architecture transformers can generate with).

    model: a transformers causal LM (PEFT-wrapped works); shared with training, so
    sync_weights is a no-op. tokenizer: tokenizes string prompts, decodes texts.
    """

    def __init__(self, model: nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context_length = getattr(self.config, "max_position_embeddings", None)

    def sync_weights(self, model: nn.Module) -> None:
        """No-op: generate runs on the policy module itself."""

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> Rollout:
        """Sample `params.n` responses per prompt (rows prompt-major), see `Rollout`."""
        return generate_in_eval_mode(self, prompts, params)

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        device = next(self.model.parameters()).device
        n = params.n
        rows = [p for p in prompt_ids for _ in range(n)]
        B, P = len(rows), max(len(p) for p in rows)
        max_new = params.max_new_tokens
        if self.context_length:
            max_new = min(max_new, self.context_length - P)
        input_ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)
        attention = torch.zeros((B, P), dtype=torch.long, device=device)
        for i, p in enumerate(rows):
            input_ids[i, P - len(p) :] = torch.tensor(p, device=device)
            attention[i, P - len(p) :] = 1
        stop_ids = eos_ids(self.tokenizer, self.config, params)
        sample = params.temperature > 0
        gen_config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            # Explicit values even when disabled: transformers otherwise fills in its own
            # defaults (top_k=50), silently truncating the distribution.
            top_p=params.top_p if sample else None,
            top_k=params.top_k if sample else None,
            # None would fall back to the model's own EOS (ignore_eos would not hold); an id
            # past the vocabulary can never be sampled, so nothing but length stops a row.
            eos_token_id=stop_ids or [self.model.get_output_embeddings().weight.shape[0]],
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
            stop_strings=params.stop_strings or None,
        )
        criteria = StoppingCriteriaList()
        if params.repetition_ngram:
            criteria.append(_RepetitionCriteria(P, params.repetition_ngram, params.repetition_max_repeats))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(int(params.seed))
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=gen_config,
                stopping_criteria=criteria,
                tokenizer=self.tokenizer if params.stop_strings else None,
            )
        response = out.sequences[:, P:]  # [B, T]
        scores = torch.stack(out.scores, dim=1).float()  # [B, T, V] processed scores
        logprobs = scores.log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)  # [B, T]
        keep = torch.isfinite(scores) if params.return_keep_mask else None
        lengths, codes = self._replay_finish(response, params, stop_ids, scores.shape[-1], max_new)
        return assemble_rollout(
            self, prompt_ids, n, response, lengths, logprobs, codes, params, stop_ids, keep
        )

    def _replay_finish(
        self, response: torch.Tensor, params: SamplingParams, stop_ids, vocab: int, max_new: int
    ):
        """Lengths [B] and finish codes [B] by running the shared FinishTracker over the steps."""
        B, T = response.shape
        tracker = FinishTracker(params, stop_ids, vocab, self.tokenizer, response.device)
        lengths = torch.full((B,), T, dtype=torch.long, device=response.device)
        codes = torch.full((B,), RUNNING, dtype=torch.long, device=response.device)
        for t in range(T):
            running = codes == RUNNING
            if not bool(running.any()):
                break
            at_limit = torch.full((B,), t + 1 >= max_new, device=response.device)
            history = response[:, : t + 1] if tracker.needs_history else None
            code = tracker.step(history, response[:, t], at_limit)
            newly = running & (code != RUNNING)
            codes = torch.where(newly, code, codes)
            lengths = torch.where(newly, t + 1, lengths)
        codes = torch.where(codes == RUNNING, LENGTH, codes)  # generate stopped them at max length
        return lengths, codes
