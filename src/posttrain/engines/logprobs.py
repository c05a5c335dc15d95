"""The training-side forward: per-token log-probs, entropy and values of given responses.

Memory: logits are only computed for response positions (hidden states are sliced
*before* the LM head), micro-batch by micro-batch, so the largest logits tensor alive is
[micro_batch, T, V] — never [B, L, V] — and the log-softmax itself is chunked over rows
by `posttrain.core.logprobs`. With gradient, each micro-batch's graph stays alive until
the caller's backward; callers that need bounded memory *with* grad pass one
micro-batch at a time (the learner does).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from posttrain.core.logprobs import entropy_from_logits, logprobs_from_logits
from posttrain.engines.batching import SequenceBatch
from posttrain.errors import ModelError

# Default budget for one micro-batch's logits: 2^24 elements = 64 MiB in float32.
DEFAULT_MAX_LOGIT_ELEMENTS = 1 << 24


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder returning last_hidden_state, lm_head) when the model exposes them."""
    get_dec = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    try:
        decoder, head = get_dec(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def _micro_batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def _auto_micro_batch(batch: SequenceBatch, vocab: int, max_logit_elements: int) -> int:
    T = max(batch.response_mask.shape[1], 1)
    return max(1, max_logit_elements // (T * vocab))


def response_logits(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Logits that predict each response token: [B, T, V] in the model's dtype.

    Row b, column t scores ``batch.response_ids[b, t]`` (hidden state at column
    response_start + t - 1). Applies Gemma-style final logit soft-capping when the config
    has it, so log-probs match what the model's own forward would give.
    """
    T, P = batch.response_mask.shape[1], batch.response_start
    if P < 1:
        raise ModelError(
            "response_logits: the batch has no prompt column to predict the first response token"
        )
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state  # [B, L, H]
        logits = head(hidden[:, P - 1 : P - 1 + T])  # [B, T, V]
    else:  # generic fallback: full forward, then slice (more memory, same numbers)
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
        logits = out.logits[:, P - 1 : P - 1 + T]
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def sequence_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    return_entropy: bool = False,
    with_grad: bool = False,
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log π(y_t | x, y_<t) of the batch's responses, and optionally entropy.

    model: a causal LM (HF, PEFT-wrapped, ...). batch: from `build_sequences`.
    temperature: the sampler's τ; log-probs are of softmax(logits / τ), matching the
        rollout engine's `sampling_logprobs` (before any top-p/top-k renormalisation).
    micro_batch_size: rows per forward; default picks the largest micro-batch whose
        logits stay under `max_logit_elements` (peak memory ∝ micro-batch, not B).
    max_logit_elements: memory budget in logits elements (default 2^24 = 64 MiB float32)
        for the automatic micro-batch and for the row chunks of the log-softmax.
    return_entropy: also return H(π(· | x, y_<t)) at each position (same τ).
    with_grad: keep the autograd graph (policy update); else run under no_grad
        (old / reference / teacher scoring).
    Returns: logprobs [B, T] float32, entropy [B, T] float32 or None. Positions with
    response_mask 0 hold finite but meaningless numbers; mask them downstream.
    """
    if temperature <= 0:
        raise ModelError(f"sequence_logprobs: temperature must be > 0 (got {temperature}); greedy uses 1.0")
    B = len(batch)
    T = batch.response_mask.shape[1]
    vocab = model.get_output_embeddings().out_features if hasattr(model, "get_output_embeddings") else 0
    size = micro_batch_size or _auto_micro_batch(batch, max(vocab, 1), max_logit_elements)
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    lp_parts, ent_parts = [], []
    with ctx:
        if B == 0 or T == 0:
            empty = batch.response_mask.new_zeros((B, T))
            return empty, (empty.clone() if return_entropy else None)
        for sl in _micro_batches(B, size):
            mb = batch.select(sl)
            logits = response_logits(model, mb)  # [b, T, V]
            # The core walks rows in chunks with float32 temporaries of chunk x V; size them
            # from the same budget so they never dwarf the micro-batch's logits.
            rows = max(1, max_logit_elements // max(logits.shape[-1], 1))
            lp_parts.append(
                logprobs_from_logits(logits, mb.response_ids, temperature, chunk_size=rows).float()
            )
            if return_entropy:
                ent_parts.append(entropy_from_logits(logits, temperature, chunk_size=rows).float())
            del logits
    logprobs = torch.cat(lp_parts, dim=0)  # [B, T]
    entropy = torch.cat(ent_parts, dim=0) if return_entropy else None
    return logprobs, entropy


def sequence_values(
    value_model: nn.Module,
    batch: SequenceBatch,
    micro_batch_size: int | None = None,
    with_grad: bool = False,
) -> torch.Tensor:
    """Critic values V(s_t) of the state *before* each response token: [B, T] float32.

    value_model: a `ScalarHeadModel` (or anything mapping (input_ids, attention_mask,
    position_ids) [B, L] to values [B, L]). Column t is the value at column
    response_start + t - 1 — the same alignment as `sequence_logprobs`, so
    advantages[b, t] pairs with logprobs[b, t] (the PPO/GAE convention: V(s_t), where
    s_t = prompt + y_<t).
    """
    B, T, P = len(batch), batch.response_mask.shape[1], batch.response_start
    if P < 1:
        raise ModelError("sequence_values: the batch has no prompt column")
    size = micro_batch_size or max(B, 1)
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    parts = []
    with ctx:
        for sl in _micro_batches(B, size):
            mb = batch.select(sl)
            if hasattr(value_model, "backbone") and hasattr(value_model, "score_hidden"):
                hidden = value_model.backbone(
                    input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids
                ).last_hidden_state  # [b, L, H]
                parts.append(value_model.score_hidden(hidden[:, P - 1 : P - 1 + T]))
            else:
                values = value_model(mb.input_ids, mb.attention_mask, mb.position_ids)  # [b, L]
                parts.append(values[:, P - 1 : P - 1 + T].float())
    if not parts:
        return batch.response_mask.new_zeros((B, T))
    return torch.cat(parts, dim=0)
