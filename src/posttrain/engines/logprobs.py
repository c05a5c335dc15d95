"""The training-side forward: per-token log-probs, entropy and values of given responses.

Memory: logits are only computed for response positions (hidden states are sliced
*before* the LM head), micro-batch by micro-batch, so the largest logits tensor alive is
[micro_batch, T, V] — never [B, L, V] — and the log-softmax itself is chunked over rows
by `posttrain.core.logprobs`. With gradient, each micro-batch's graph stays alive until
the caller's backward; callers that need bounded memory *with* grad pass one
micro-batch at a time (the learner does).

Shared prompts: a GRPO batch holds P prompts x G samples, and DPO's chosen/rejected rows
come in pairs, so most prompt columns are repeats. `response_hidden` runs each distinct
prompt once through the decoder with a KV cache, gathers the cache to its rows with
`index_select` (differentiable: every sample's gradient reaches the one prompt pass) and
runs only the response columns on top. Same numbers as the full [B, L] forward up to
float rounding; the prompt's token-forwards drop by a factor G. Micro-batches are cut
along prompt groups (`group_micro_batches`) so sharing survives micro-batching.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from posttrain.core.logprobs import entropy_from_logits, logprobs_from_logits
from posttrain.engines.batching import SequenceBatch, group_micro_batches, to_model_device
from posttrain.engines.fastpath import record_fallback
from posttrain.engines.hf_compat import cache_argument, forward_with_cache, new_cache, reorder_cache
from posttrain.errors import ModelError

# Default budget for one micro-batch's logits: 2^24 elements = 64 MiB in float32.
DEFAULT_MAX_LOGIT_ELEMENTS = 1 << 24
# Share prompts only when that skips at least this fraction of the token-forwards: the
# shared path runs the decoder twice and copies the prompt's KV cache to every row, which
# a tiny saving does not pay for (small preset, CPU: still 7% faster at a 10% saving).
MIN_SHARED_SAVING = 0.1


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


def _share_blocker(decoder: nn.Module) -> str | None:
    """Why `decoder` cannot run prompts once and continue from a plain KV cache (None: it can)."""
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:
        return "activation checkpointing is on (transformers drops the KV cache under it)"
    config = getattr(decoder, "config", None)
    # Sliding-window, linear-attention and hybrid layers need their own cache classes;
    # only plain full attention is known to give the same numbers from a DynamicCache.
    layer_types = set(getattr(config, "layer_types", None) or ()) - {"full_attention"}
    if layer_types:
        return f"layer types {sorted(layer_types)} need their own cache classes"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention needs its own cache class"
    if cache_argument(decoder) is None:
        return f"{type(decoder).__name__}.forward takes no KV cache argument (transformers API change?)"
    return None


def _mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """The [b, l] attention mask, or None when nothing is padded: HF then keeps SDPA's
    causal fast path (an all-ones mask costs +23-30% forward time, docs/benchmarks.md)."""
    return None if bool(mask.all()) else mask


def _is_sharded(decoder: nn.Module) -> bool:
    """True for an FSDP2-sharded decoder (torch.distributed). Sharing is data dependent (it
    pays on one rank's rows and not on another's) and adds a decoder call, so ranks would
    issue different numbers of all-gathers: sharded decoders always take the full forward."""
    layers = getattr(decoder, "layers", None)
    first = layers[0] if layers is not None and len(layers) else decoder
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(first, FSDPModule)


def _share_plan(decoder: nn.Module, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first [U], inverse [B]) from `SequenceBatch.prompt_groups` when sharing pays off.

    A batch whose prompts repeat too little is not a fallback (sharing would not pay); a
    decoder that cannot share on a batch that would pay is counted (`record_fallback`).
    """
    B, P, T = len(batch), batch.response_start, batch.response_mask.shape[1]
    if B < 2 or T < 1 or _is_sharded(decoder):
        return None
    first, inverse = batch.prompt_groups()
    saved = (B - len(first)) * P / (B * (P + T - 1))  # fraction of token-forwards skipped
    if saved < MIN_SHARED_SAVING:
        return None
    blocker = _share_blocker(decoder)
    if blocker is not None:
        record_fallback("shared_prompts", blocker)
        return None
    return first, inverse


def _shared_prompt_hidden(
    decoder: nn.Module, batch: SequenceBatch, first: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor | None:
    """`response_hidden` with each distinct prompt run once; None if the cache stayed empty."""
    P, T = batch.response_start, batch.response_mask.shape[1]
    cache = new_cache()
    out = forward_with_cache(
        decoder,
        cache,
        input_ids=batch.input_ids[first, :P],
        attention_mask=_mask_or_none(batch.attention_mask[first, :P]),
        position_ids=batch.position_ids[first, :P],
    )
    if cache.get_seq_length() != P:
        record_fallback("shared_prompts", f"{type(decoder).__name__} left the KV cache empty")
        return None  # a decoder that ignores its cache argument: take the full forward
    first_hidden = out.last_hidden_state[:, -1:].index_select(0, inverse)  # [B, 1, H] predicts token 0
    if T == 1:
        return first_hidden
    # Per-layer index_select of keys/values: differentiable, so the gradients of all rows
    # of a group add up in the one prompt pass (what the [B, L] forward computes).
    reorder_cache(cache, inverse)
    L = P + T - 1  # the last response token predicts nothing: its column is skipped
    out = forward_with_cache(
        decoder,
        cache,
        input_ids=batch.input_ids[:, P:L],
        attention_mask=_mask_or_none(batch.attention_mask[:, :L]),
        position_ids=batch.position_ids[:, P:L],
    )
    return torch.cat([first_hidden, out.last_hidden_state], dim=1)  # [B, T, H]


def response_hidden(decoder: nn.Module, batch: SequenceBatch, *, share_prompts: bool = True) -> torch.Tensor:
    """Decoder hidden states that predict each response token: [B, T, H].

    decoder: a HF base model (``model.get_decoder()``, a value model's backbone) mapping
    (input_ids, attention_mask, position_ids) [b, l] to ``last_hidden_state`` [b, l, H].
    Column t is the hidden state at column response_start + t - 1. share_prompts: run
    each distinct prompt once with a KV cache when the batch repeats prompts enough
    (`MIN_SHARED_SAVING`) and the decoder supports it (full attention, cache, no
    activation checkpointing in training); False always runs the full [B, L] forward.
    """
    P, T = batch.response_start, batch.response_mask.shape[1]
    if P < 1:
        raise ModelError(
            "response_hidden: the batch has no prompt column to predict the first response token"
        )
    plan = _share_plan(decoder, batch) if share_prompts else None
    if plan is not None:
        hidden = _shared_prompt_hidden(decoder, batch, *plan)
        if hidden is not None:
            return hidden
    L = P + max(T - 1, 0)
    hidden = decoder(
        input_ids=batch.input_ids[:, :L],
        attention_mask=_mask_or_none(batch.attention_mask[:, :L]),
        position_ids=batch.position_ids[:, :L],
    ).last_hidden_state  # [B, L, H]
    return hidden[:, P - 1 : P - 1 + T]  # [B, T, H]


def _plan_micro_batches(
    batch: SequenceBatch, size: int, share_prompts: bool
) -> tuple[list[torch.Tensor | slice], torch.Tensor | None]:
    """Row selections of <= size rows, and the permutation [B] that restores row order
    after concatenating their outputs (None when the selections are in order)."""
    B = len(batch)
    if not share_prompts or B <= size or batch.response_start < 1:
        return [slice(s, min(s + size, B)) for s in range(0, B, size)], None
    _, inverse = batch.prompt_groups()
    parts = group_micro_batches(inverse, size)
    order = torch.cat(parts)  # [B]
    restore = torch.empty_like(order).scatter_(0, order, torch.arange(B, device=order.device))
    return parts, restore


def _auto_micro_batch(batch: SequenceBatch, vocab: int, max_logit_elements: int) -> int:
    T = max(batch.response_mask.shape[1], 1)
    return max(1, max_logit_elements // (T * vocab))


def response_logits(model: nn.Module, batch: SequenceBatch, *, share_prompts: bool = True) -> torch.Tensor:
    """Logits that predict each response token: [B, T, V] in the model's dtype.

    Row b, column t scores ``batch.response_ids[b, t]`` (hidden state at column
    response_start + t - 1). Applies Gemma-style final logit soft-capping when the config
    has it, so log-probs match what the model's own forward would give. share_prompts:
    see `response_hidden` (models without a decoder/head pair always take one full forward).
    """
    T, P = batch.response_mask.shape[1], batch.response_start
    if P < 1:
        raise ModelError(
            "response_logits: the batch has no prompt column to predict the first response token"
        )
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        logits = head(response_hidden(decoder, batch, share_prompts=share_prompts))  # [B, T, V]
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
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log π(y_t | x, y_<t) of the batch's responses, and optionally entropy.

    model: a causal LM (HF, PEFT-wrapped, ...). batch: from `build_sequences`.
    temperature: the sampler's τ; log-probs are of softmax(logits / τ), matching the
        rollout engine's `sampling_logprobs` (before any top-p/top-k renormalisation).
    micro_batch_size: rows per forward; default picks the largest micro-batch whose
        logits stay under `max_logit_elements` (peak memory ∝ micro-batch, not B).
        With share_prompts, micro-batches are cut along prompt groups, so a group is
        only split when it alone exceeds the micro-batch.
    max_logit_elements: memory budget in logits elements (default 2^24 = 64 MiB float32)
        for the automatic micro-batch and for the row chunks of the log-softmax.
    return_entropy: also return H(π(· | x, y_<t)) at each position (same τ).
    with_grad: keep the autograd graph (policy update); else run under no_grad
        (old / reference / teacher scoring).
    share_prompts: run each distinct prompt once per micro-batch (see `response_hidden`).
    Returns: logprobs [B, T] float32, entropy [B, T] float32 or None, in the batch's row
    order. Positions with response_mask 0 hold finite but meaningless numbers; mask them
    downstream.
    """
    if temperature <= 0:
        raise ModelError(f"sequence_logprobs: temperature must be > 0 (got {temperature}); greedy uses 1.0")
    batch, home = to_model_device(model, batch)  # results come back on the batch's device
    B = len(batch)
    T = batch.response_mask.shape[1]
    vocab = model.get_output_embeddings().out_features if hasattr(model, "get_output_embeddings") else 0
    size = micro_batch_size or _auto_micro_batch(batch, max(vocab, 1), max_logit_elements)
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    lp_parts, ent_parts = [], []
    with ctx:
        if B == 0 or T == 0:
            empty = batch.response_mask.new_zeros((B, T), device=home)
            return empty, (empty.clone() if return_entropy else None)
        selections, restore = _plan_micro_batches(batch, size, share_prompts)
        for sel in selections:
            mb = batch.select(sel)
            logits = response_logits(model, mb, share_prompts=share_prompts)  # [b, T, V]
            # The core walks rows in chunks with float32 temporaries of chunk x V; size them
            # from the same budget so they never dwarf the micro-batch's logits.
            rows = max(1, max_logit_elements // max(logits.shape[-1], 1))
            lp_parts.append(
                logprobs_from_logits(logits, mb.response_ids, temperature, chunk_size=rows).float()
            )
            if return_entropy:
                ent_parts.append(entropy_from_logits(logits, temperature, chunk_size=rows).float())
            del logits
        logprobs = _in_row_order(lp_parts, restore).to(home)  # [B, T]
        entropy = _in_row_order(ent_parts, restore).to(home) if return_entropy else None
    return logprobs, entropy


def _in_row_order(parts: list[torch.Tensor], restore: torch.Tensor | None) -> torch.Tensor:
    """Concatenate per-micro-batch outputs [b_i, T] and undo the grouping permutation."""
    out = torch.cat(parts, dim=0)  # [B, T]
    return out if restore is None else out.index_select(0, restore)


def sequence_values(
    value_model: nn.Module,
    batch: SequenceBatch,
    micro_batch_size: int | None = None,
    with_grad: bool = False,
    share_prompts: bool = True,
) -> torch.Tensor:
    """Critic values V(s_t) of the state *before* each response token: [B, T] float32.

    value_model: a `ScalarHeadModel` (or anything mapping (input_ids, attention_mask,
    position_ids) [B, L] to values [B, L]). Column t is the value at column
    response_start + t - 1 — the same alignment as `sequence_logprobs`, so
    advantages[b, t] pairs with logprobs[b, t] (the PPO/GAE convention: V(s_t), where
    s_t = prompt + y_<t). share_prompts: run each distinct prompt once per micro-batch
    (ScalarHeadModel backbones only; see `response_hidden`).
    """
    batch, home = to_model_device(value_model, batch)  # results come back on the batch's device
    B, T, P = len(batch), batch.response_mask.shape[1], batch.response_start
    if P < 1:
        raise ModelError("sequence_values: the batch has no prompt column")
    size = micro_batch_size or max(B, 1)
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    parts = []
    with ctx:
        if B == 0:
            return batch.response_mask.new_zeros((B, T), device=home)
        selections, restore = _plan_micro_batches(batch, size, share_prompts)
        for sel in selections:
            mb = batch.select(sel)
            if hasattr(value_model, "backbone") and hasattr(value_model, "score_hidden"):
                hidden = response_hidden(value_model.backbone, mb, share_prompts=share_prompts)  # [b, T, H]
                parts.append(value_model.score_hidden(hidden))
            else:
                values = value_model(mb.input_ids, mb.attention_mask, mb.position_ids)  # [b, L]
                parts.append(values[:, P - 1 : P - 1 + T].float())
        return _in_row_order(parts, restore).to(home)
