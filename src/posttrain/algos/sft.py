"""Supervised fine-tuning: completion-only negative log-likelihood, plain or packed.

Shapes: B sequences (rows), T response tokens, L packed row length, V vocabulary.

SFT maximises log π_θ(y* | x) of reference completions (study guide §SFT:
L_SFT = −Σ_t log π_θ(y*_t | x, y*_<t)). Prompt tokens are context only: their loss
is masked out, so the model is not trained to produce the user's question.

Two layouts reach the same loss:

* unpadded rows (`posttrain.engines.batching.build_sequences`, prompts left-padded,
  completions right-padded) scored with `posttrain.engines.logprobs.sequence_logprobs`;
* packed rows (`pack_examples`): several (prompt, completion) examples concatenated
  into one row with position ids restarting at 0 for each example, and an explicit
  block-diagonal causal attention mask (`block_causal_mask`) so packed examples never
  attend to each other — whatever the transformers version does with position ids
  (versions before ~4.54 derive no block mask from them). flash_attention_2 takes no 4D
  mask; it gets the position ids alone and runs the examples as variable-length sequences.
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
    segment_ids: [B, L] long, which example of the row each token belongs to (the padding
        tail is a segment of its own): the blocks of `block_causal_mask`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    segment_ids: torch.Tensor | None = None  # [B, L] example index of each token (padding: its own)

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
    segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, examples in enumerate(rows):
        col = 0
        for k, (p, c) in enumerate(examples):
            n = len(p) + len(c)
            input_ids[r, col : col + n] = torch.tensor(p + c, dtype=torch.long)
            position_ids[r, col : col + n] = torch.arange(n)
            target[r, col + len(p) : col + n] = 1.0
            segment_ids[r, col : col + n] = k
            col += n
        # The padding tail gets its own positions from 0 and its own segment, so it forms a
        # separate block instead of extending the last real example.
        position_ids[r, col:] = torch.arange(width - col)
        segment_ids[r, col:] = len(examples)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        mask=target[:, 1:].contiguous(),
        segment_ids=segment_ids,
    )


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D attention mask [B, 1, L, L]: 0 where query q may attend key k (same
    segment and k <= q), the dtype's most negative value elsewhere (softmax weight exactly 0).

    segment_ids: [B, L] long, example index of each token. Float-additive rather than
    boolean: the form every transformers version and attention kernel (eager, sdpa) takes
    as a prepared 4D mask.
    """
    L = segment_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()  # [L, L]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
    allowed = (same & causal)[:, None]  # [B, 1, L, L]
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=zero.device))


def packed_logprobs(model: torch.nn.Module, batch: PackedBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of a packed batch: [B, L-1], entry t = log π(input_ids[t+1] | ≤t).

    Examples attend only within themselves: an explicit `block_causal_mask` of the batch's
    segments (flash_attention_2, which takes no 4D mask, gets the position ids restarting
    at 0 alone and treats the examples as variable-length sequences). Positions whose next
    token starts a new example get a log-prob too, but `batch.mask` is 0 there (the first
    token of every prompt is never a target).
    """
    kwargs = {}
    config = getattr(model, "config", None)
    if batch.segment_ids is not None and getattr(config, "_attn_implementation", None) != "flash_attention_2":
        dtype = next(model.parameters()).dtype
        kwargs["attention_mask"] = block_causal_mask(batch.segment_ids.to(batch.input_ids.device), dtype)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    logits = out.logits[:, :-1]  # [B, L-1, V]
    return logprobs_from_logits(logits, batch.input_ids[:, 1:], temperature=temperature)
