"""Supervised fine-tuning: completion-only negative log-likelihood, plain or packed.

Shapes: B sequences (rows), T response tokens, L packed row length, V vocabulary.

SFT maximises log π_θ(y* | x) of reference completions (study guide §SFT:
L_SFT = −Σ_t log π_θ(y*_t | x, y*_<t)). Prompt tokens are context only: their loss
is masked out, so the model is not trained to produce the user's question.

Two layouts reach the same loss:

* unpadded rows (`posttrain.engines.batching.build_sequences`, prompts left-padded,
  completions right-padded) scored with `posttrain.engines.logprobs.sequence_logprobs`;
* packed rows (`pack_examples`): several (prompt, completion) examples concatenated
  into one row with position ids restarting at 0 for each example. With no 2D
  attention mask, transformers derives a block-diagonal causal mask from the position
  ids, so packed examples never attend to each other. That derivation is transformers'
  behaviour, tested on the declared lower bound (5.23) and the locked release by
  tests/algos/test_offline_algos.py (the later example's loss has exactly zero gradient
  with respect to the earlier example's embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.core.logprobs import logprobs_from_logits
from posttrain.core.masking import aggregate
from posttrain.engines.scoring import render_prompt  # noqa: F401  (re-exported: trainers import it from here)
from posttrain.errors import DataError


def sft_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token-mean",
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Completion-only negative log-likelihood.

    logprobs: [B, T] log π_θ of each target token (with grad).
    mask: [B, T] 1 where the token is part of a completion (prompt and padding are 0).
    mode: aggregation (core/masking.py AGGREGATIONS); "token-mean" weights every
        completion token equally, the usual SFT choice.
    num_tokens / num_seqs / max_len: GLOBAL counts of the whole optimizer step (all
        micro-batches), so that the sum of this loss over micro-batches equals the loss of
        the whole batch: gradient accumulation 8×1 gives the same update as 1×8.

    Returns (scalar loss to minimise, detached metrics {"sft/nll_sum", "sft/tokens"}); the
    caller divides the summed "sft/nll_sum" by the summed "sft/tokens" to log a mean.
    """
    nll = -logprobs  # [B, T]
    loss = aggregate(nll, mask, mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    metrics = {
        "sft/nll_sum": (nll.detach() * mask).sum(),
        "sft/tokens": mask.sum().detach(),
    }
    return loss, metrics


def strip_thinking(completion: str, open_tag: str = "<think>", close_tag: str = "</think>") -> str:
    """The completion without its leading <think>…</think> block (for no-think SFT rows).

    A completion with no thinking block is returned unchanged.
    """
    text = completion.lstrip()
    if text.startswith(open_tag) and close_tag in text:
        return text.split(close_tag, 1)[1].lstrip()
    return completion


@dataclass
class PackedBatch:
    """Examples packed into rows for one forward pass.

    input_ids: [B, L] long, examples back to back, the tail padded with pad_id.
    position_ids: [B, L] long, restarting at 0 at each example (and at the padding tail)
        so that transformers builds a block-diagonal causal mask.
    mask: [B, L-1] float, 1 where the NEXT token (input_ids[:, 1:]) is a completion token
        — the loss target layout after the one-token shift of causal LM training.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_examples(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    max_length: int,
    pad_id: int,
) -> PackedBatch:
    """Greedy first-fit packing of (prompt, completion) examples into rows of max_length.

    prompt_ids / completion_ids: B lists of token ids (the completion already ends in EOS).
    max_length: row capacity in tokens; an example longer than that is a DataError (it
        would have to be truncated, and silent truncation corrupts the target).
    pad_id: token id for the padding tail (masked out of the loss).

    Order is kept (first-fit over rows in input order) so packing is deterministic.
    """
    if len(prompt_ids) != len(completion_ids):
        raise DataError(f"pack_examples: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    rows: list[list[tuple[list[int], list[int]]]] = []
    fill: list[int] = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(p) + len(c)
        if n > max_length:
            raise DataError(
                f"example {i}: {n} tokens (prompt {len(p)} + completion {len(c)}) exceed "
                f"max_length {max_length}; raise data.max_length or drop the row"
            )
        for r, used in enumerate(fill):
            if used + n <= max_length:
                rows[r].append((p, c))
                fill[r] += n
                break
        else:
            rows.append([(p, c)])
            fill.append(n)
    width = max(fill)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.float32)  # 1 where the token is a target
    for r, examples in enumerate(rows):
        col = 0
        for p, c in examples:
            n = len(p) + len(c)
            input_ids[r, col : col + n] = torch.tensor(p + c, dtype=torch.long)
            position_ids[r, col : col + n] = torch.arange(n)
            target[r, col + len(p) : col + n] = 1.0
            col += n
        # The padding tail gets its own positions from 0 so it forms a separate "example"
        # in the derived block mask instead of extending the last real one.
        position_ids[r, col:] = torch.arange(width - col)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, mask=target[:, 1:].contiguous())


def packed_logprobs(model: torch.nn.Module, batch: PackedBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of a packed batch: [B, L-1], entry t = log π(input_ids[t+1] | ≤t).

    The attention mask is deliberately omitted: transformers then infers the packed layout
    from position ids restarting at 0 and keeps examples from attending to each other.
    Positions whose next token starts a new example get a log-prob too, but `batch.mask`
    is 0 there (the first token of every prompt is never a target).
    """
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    logits = out.logits[:, :-1]  # [B, L-1, V]
    return logprobs_from_logits(logits, batch.input_ids[:, 1:], temperature=temperature)
