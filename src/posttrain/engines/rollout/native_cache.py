"""KV-cache continuation for the native engine: a later turn pre-fills only its new tokens.

A multi-turn rollout (multiturn.py) samples turn k+1 from prompt + turn 1 + observation
1 + ... + observation k. Re-encoding that whole sequence at every turn costs a prefill
that grows with the conversation; instead `NativeEngine.generate_cached` returns, per
finished row, a `RowCache` — the keys/values of its prompt and of all its sampled tokens
but the last (the last one's keys/values are never computed by the decode loop when the
row stops at that step) — and the next call pre-fills only the rest: the last sampled
token and the observation's ids.

Cache layout of a continuation call over rows r = 0..B-1, with c_r cached tokens and
n_r new ones (C = max c_r, Q = max n_r):

    slots [0, C)       row r's cached keys/values right-aligned: [C - c_r, C) real, the rest masked
    slots [C, C + Q)   row r's new tokens left-aligned: [C, C + n_r) real, [C + n_r, C + Q) a hole
    slots [C + Q, ...) the decode loop's sampled tokens, as in a first call

The new tokens are one chunk of Q queries over the cache (`NativeEngine._forward` with
chunk=True); holes and left padding are -inf in every later attention mask. Positions
count real tokens only (c_r + j for new token j), as in the re-encode path, so the rotary
phases are the same; the next-token logits of row r come from its new token n_r - 1.

Exactness: the sampled tokens are those of the re-encode path for the same seed (the
per-turn generator and its one uniform per row are the same), and the sampling log-probs
agree to float rounding, not bit for bit: the cached keys/values were computed one token
at a time by the decode loop, the re-encode path computes them in one prefill matmul, and
the two reduce in different orders (differences ~1e-6 in log-probs; tests/engines/
test_kv_continuation.py measures them). A token can differ only if a uniform lands within
that rounding of a boundary of the cumulative distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.engines.rollout.common import STOP
from posttrain.errors import ModelError


@dataclass
class RowCache:
    """One sequence's cache: `ids` (the tokens covered, positions 0..len-1) and, per
    decoder layer, keys / values [H_kv, len(ids), D]."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class Prefilled:
    """A batch ready to decode: next-token logits [B, V], KV caches [B, H_kv, S, D] per
    layer, the additive decode mask [B, H_kv, 1, S], real tokens per row before decoding
    (lens [B], also the first decode position), new tokens allowed (limit [B]), the first
    decode slot P, the longest limit T, rotary tables [S, D]."""

    logits: torch.Tensor
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    step_mask: torch.Tensor
    lens: torch.Tensor
    limit: torch.Tensor
    P: int
    T: int
    cos_t: torch.Tensor
    sin_t: torch.Tensor


def prefill_continue(
    engine, seqs: list[list[int]], caches: list[RowCache], params, plans, final_norm
) -> Prefilled:
    """Pre-fill only what each row's sequence adds to its cache (layout: module docstring)."""
    from posttrain.engines.rollout.native import _additive

    if len(caches) != len(seqs):
        raise ModelError(f"generate_cached: {len(caches)} caches for {len(seqs)} prompts")
    inner, lm_head = engine.inner, engine.model.get_output_embeddings()
    device, dtype = lm_head.weight.device, lm_head.weight.dtype
    B = len(seqs)
    cached = [len(rc.ids) for rc in caches]
    for r, (seq, rc) in enumerate(zip(seqs, caches)):
        if len(seq) <= len(rc.ids) or seq[: len(rc.ids)] != rc.ids:
            raise ModelError(f"generate_cached: prompt {r} does not extend its cache's ids")
    new = [seq[c:] for seq, c in zip(seqs, cached)]
    C, Q = max(cached), max(map(len, new))
    P = C + Q
    lens = torch.tensor([len(s) for s in seqs], device=device)  # [B] real tokens
    limit, T = engine._limits(lens, params)
    S = P + T
    k_cache, v_cache = engine._empty_cache(B, S, dtype, device)
    for cache in (*k_cache, *v_cache):  # the left padding of shorter prefixes is never written:
        cache[:, :, :C].zero_()  # finite, so that -inf masks it (garbage NaN would survive the mask)
    valid = torch.zeros((B, P), dtype=torch.bool, device=device)  # [B, P] real slots before decoding
    input_ids = torch.full((B, Q), engine.pad_id, dtype=torch.long, device=device)
    for r, rc in enumerate(caches):  # once per call, not per token
        c, m = cached[r], len(new[r])
        for layer, (k, v) in enumerate(zip(rc.keys, rc.values)):
            k_cache[layer][r, :, C - c : C] = k
            v_cache[layer][r, :, C - c : C] = v
        valid[r, C - c : C] = True
        valid[r, C : C + m] = True
        input_ids[r, :m] = torch.tensor(new[r], device=device)
    n_new = torch.tensor([len(x) for x in new], device=device)  # [B]
    positions = torch.tensor(cached, device=device)[:, None] + torch.arange(Q, device=device)[None]  # [B, Q]
    # Query j (slot C + j) sees the real slots up to its own; a hole's query still sees
    # the row's real tokens, so no softmax row is empty.
    causal = torch.ones((Q, P), dtype=torch.bool, device=device).tril(diagonal=C)  # [Q, P]
    mask = causal[None] & valid[:, None, :]  # [B, Q, P]
    embeds = inner.embed_tokens(input_ids)  # [B, Q, H]
    cos_t, sin_t = engine._rotary(embeds, S)
    hidden = engine._forward(plans, embeds, cos_t[positions], sin_t[positions],
                             _additive(mask[:, None], dtype), k_cache, v_cache, C, chunk=True)  # fmt: skip
    last = hidden[torch.arange(B, device=device), n_new - 1]  # [B, H] each row's last real token
    logits = lm_head(final_norm(last))  # [B, V]
    step_mask = torch.zeros((B, engine.config.num_key_value_heads, 1, S), dtype=dtype, device=device)
    step_mask[..., :P].masked_fill_(~valid[:, None, None, :], float("-inf"))
    return Prefilled(logits, k_cache, v_cache, step_mask, lens, limit, P, T, cos_t, sin_t)


def save_row_caches(kept, slots, rows, codes, lengths, state: Prefilled, out_ids, prompt_ids, n) -> None:
    """Copy out the cache of every finished-by-"stop" row in batch `slots` (not yet saved)
    into kept[row]: its real slots before decoding and its first length - 1 sampled tokens."""
    for s in slots.tolist():
        row = int(rows[s])
        if kept[row] is not None or int(codes[row]) != STOP:
            continue
        length = int(lengths[row])
        written = state.P + length - 1  # sampled token t sits in slot P + t
        real = (state.step_mask[s, 0, 0, :written] == 0).nonzero().squeeze(-1)  # [c]
        ids = list(prompt_ids[row // n]) + out_ids[row, : length - 1].tolist()
        if real.numel() != len(ids):  # the layout guarantees it; a mismatch would corrupt turns
            raise ModelError(
                f"native engine: row {row} has {real.numel()} cached slots for {len(ids)} tokens"
            )
        kept[row] = RowCache(
            ids, [k[s][:, real] for k in state.k_cache], [v[s][:, real] for v in state.v_cache]
        )
