"""Thinking budget: cut a sample's thinking at N tokens, close it, let the model answer.

The case-studies seed (III.3 "Qwen 3", "Early Stopping and Graceful Degradation") and the
Qwen3 report: when a response's thinking reaches a user-set budget, generation of the
thinking stops, the termination phrase "Considering the limited time by the user, I
have to give the solution based on the thinking directly now." and `</think>` are
inserted, and the model writes its answer from the partial reasoning.

`ThinkingBudgetEngine` wraps any rollout engine (native | hf | vllm) and keeps the
`RolloutEngine` contract, so `posttrain eval` and the RL loop use it unchanged:

1. every sample generates at most `budget` tokens, stopping early right after `</think>`;
2. a sample still thinking at the budget (finish "length", no `</think>`) gets the
   termination phrase and `</think>` appended — FORCED tokens, not sampled;
3. every sample that closed its thinking (by itself or forced) and is not finished
   continues from prompt + its tokens so far, within the remaining max_new_tokens.

The returned response is phase-1 tokens + forced tokens + phase-2 tokens; the forced
tokens have mask 0 and sampling log-prob 0, so RL never trains the policy to produce the
phrase it did not sample (they stay in the context the answer is scored in). Each
sample's budget is its own (samples of one prompt are cut independently).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import encode_prompts
from posttrain.engines.thinking import DEFAULT_PHRASE, THINK_END
from posttrain.errors import ModelError

__all__ = ["DEFAULT_PHRASE", "THINK_END", "ThinkingBudgetEngine"]


class ThinkingBudgetEngine:
    """A RolloutEngine whose samples think for at most `budget` tokens (see module doc)."""

    def __init__(self, inner, tokenizer, budget: int, phrase: str = DEFAULT_PHRASE):
        if budget < 1:
            raise ModelError(f"thinking budget must be >= 1 token, got {budget}")
        self.inner, self.tokenizer, self.budget = inner, tokenizer, budget
        self.forced_ids = tokenizer(phrase + THINK_END, add_special_tokens=False)["input_ids"]
        self.cut_total = 0  # samples whose thinking was cut, over every generate call
        self.samples_total = 0

    def __getattr__(self, name):  # everything else (tokenizer, close, ...) is the inner engine's
        return getattr(self.inner, name)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.inner.sync_weights(model)

    def generate(self, prompts, params: SamplingParams) -> Rollout:
        if params.return_keep_mask:
            raise ModelError(
                "a thinking budget cannot return keep masks (forced tokens have no sampler support)"
            )
        prompt_ids = encode_prompts(prompts, self.tokenizer, None)
        if self.budget >= params.max_new_tokens:
            self.samples_total += len(prompt_ids) * params.n
            return self.inner.generate(prompt_ids, params)
        first = self.inner.generate(
            prompt_ids,
            replace(params, max_new_tokens=self.budget, stop_strings=[*params.stop_strings, THINK_END]),
        )
        n_rows = len(first)
        tokens = [first.response_ids[b][first.mask[b] > 0].tolist() for b in range(n_rows)]
        logps = [first.sampling_logprobs[b][first.mask[b] > 0].tolist() for b in range(n_rows)]
        forced = [[] for _ in range(n_rows)]
        reasons = list(first.finish_reason)
        go_on = []
        for b in range(n_rows):
            text, why = first.texts[b], first.finish_reason[b]
            closed_itself = why == "stop" and text.endswith(THINK_END)
            if why == "length" and self._thinking(prompt_ids[int(first.group_id[b])], text):
                forced[b] = list(self.forced_ids)
            if not (closed_itself or why == "length"):
                continue  # finished (EOS, a caller's stop string, repetition) within the budget
            room = params.max_new_tokens - len(tokens[b]) - len(forced[b])
            if room >= 1:
                go_on.append((b, room))
            else:
                reasons[b] = "length"
        self.cut_total += sum(1 for f in forced if f)
        self.samples_total += n_rows
        extra: dict[int, tuple[list[int], list[float], str]] = {}
        for room in sorted({r for _, r in go_on}):  # one call per remaining length
            rows = [b for b, r in go_on if r == room]
            ctx = [prompt_ids[int(first.group_id[b])] + tokens[b] + forced[b] for b in rows]
            seed = None if params.seed is None else params.seed * 1_000_003 + 7 + room
            second = self.inner.generate(ctx, replace(params, n=1, max_new_tokens=room, seed=seed))
            for j, b in enumerate(rows):
                keep = second.mask[j] > 0
                extra[b] = (second.response_ids[j][keep].tolist(), second.sampling_logprobs[j][keep].tolist(),
                            second.finish_reason[j])  # fmt: skip
        return self._assemble(prompt_ids, first, tokens, logps, forced, reasons, extra)

    def _thinking(self, prompt: list[int], text: str) -> bool:
        """Whether a sample is inside an open think block: opened in its text (or by a
        template that pre-fills `<think>`) and not closed."""
        if THINK_END in text:
            return False
        if "<think>" in text:
            return True
        return self.tokenizer.decode(prompt[-8:], skip_special_tokens=False).rstrip().endswith("<think>")

    def _assemble(self, prompt_ids, first, tokens, logps, forced, reasons, extra) -> Rollout:
        rows_ids, rows_mask, rows_lp = [], [], []
        for b in range(len(first)):
            ids2, lp2, why = extra.get(b, ([], [], reasons[b]))
            reasons[b] = why
            rows_ids.append(tokens[b] + forced[b] + ids2)
            rows_mask.append([1.0] * len(tokens[b]) + [0.0] * len(forced[b]) + [1.0] * len(ids2))
            rows_lp.append(logps[b] + [0.0] * len(forced[b]) + lp2)
        T = max(1, max(len(r) for r in rows_ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows_ids), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows_ids), T), dtype=torch.float32)
        lps = torch.zeros((len(rows_ids), T), dtype=torch.float32)
        for b, (r, m, lp) in enumerate(zip(rows_ids, rows_mask, rows_lp)):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(m)] = torch.tensor(m)
            lps[b, : len(lp)] = torch.tensor(lp)
        texts = [self.tokenizer.decode(r, skip_special_tokens=False) for r in rows_ids]
        return Rollout(
            prompt_ids=[list(p) for p in first.prompt_ids] if first.prompt_ids else prompt_ids,
            response_ids=ids,
            mask=mask,
            sampling_logprobs=lps,
            finish_reason=reasons,
            group_id=first.group_id.clone(),
            texts=texts,
        )
