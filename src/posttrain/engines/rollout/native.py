"""The native rollout engine: a batched sampler with a preallocated KV cache.

It drives the Hugging Face Llama/Qwen2 modules directly (embedding, each layer's norms,
projections and MLP, the rotary embedding, the LM head) instead of going through
`generate`, which removes the per-step overhead that dominates small models on CPU:

- one preallocated KV cache [B, H_kv, P + T, D] per layer, written in place;
- each distinct prompt is pre-filled once and its cache rows copied to its n samples
  (RL asks for G samples per prompt: the prefill shrinks G-fold);
- decode attention is two batched matmuls over a grouped view (the H / H_kv query heads
  of a KV head are its "query rows", so keys/values are never repeated), with an
  additive padding mask built once per call;
- finished sequences leave the batch in batches (cache rows compacted in place once an
  eighth of the slots are dead), so compute follows the number of live sequences
  without copying the cache at every finish;
- no per-sequence Python work per token: sampling (inverse CDF, one uniform per row),
  stop tokens, repetition detection and bookkeeping are tensor ops; stop strings decode
  only the few rows whose newest token could complete one.

torch.compile was tried on the layer stack (dynamic shapes): ~2 minutes to compile on
the 2-core CPU and slower per call than eager (graph breaks on the per-layer callables),
so the engine stays eager.

Because it calls the policy's own modules, the engine shares the weights with training
(sync_weights is a no-op) and LoRA-wrapped projections work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import (
    LENGTH,
    RUNNING,
    FinishTracker,
    assemble_rollout,
    cdf_dtype,
    eos_ids,
    generate_in_eval_mode,
    make_generator,
    sample_tokens,
)
from posttrain.engines.rollout.native_cache import Prefilled, RowCache, prefill_continue, save_row_caches
from posttrain.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


# Finished sequences stay in the batch (computing tokens nobody reads) until at least
# 1/EVICT_FRACTION of the slots are dead; then the cache rows are compacted in one pass.
# Evicting on every finish copied the whole cache at nearly every step of an RL rollout.
EVICT_FRACTION = 8


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021) in the HF half-rotation layout; x [B, H, L, D], cos/sin [B, L, D].

    HF computes x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1); here
    `sin` already carries that sign on its first half, so rotate_half becomes one roll
    (same floats: negation is exact).
    """
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin[:, None]


class NativeEngine:
    """Batched sampling for Llama/Qwen2-family causal LMs (see module docstring).

    model: a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` /
        `MistralForCausalLM` (without sliding-window attention), optionally PEFT-wrapped.
    tokenizer: used to tokenize string prompts, for stop strings and to decode texts.
    """

    def __init__(self, model: nn.Module, tokenizer):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        model_type = getattr(config, "model_type", type(base).__name__)
        inner = getattr(base, "model", None)
        if model_type not in SUPPORTED_MODEL_TYPES or inner is None or not hasattr(inner, "layers"):
            raise ModelError(
                f"the native engine supports {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs, not "
                f"{model_type!r}; use engine 'hf'"
            )
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ModelError("the native engine does not implement sliding-window attention; use engine 'hf'")
        self.model = base
        self.inner = inner
        self.tokenizer = tokenizer
        self.config = config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context_length = getattr(config, "max_position_embeddings", None)

    def sync_weights(self, model: nn.Module) -> None:
        """No-op: the engine calls the policy's own modules, so it always sees current weights."""

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> Rollout:
        """Sample `params.n` responses per prompt. See `Rollout` for the output fields.

        Rows are ordered prompt-major (row i belongs to prompt i // n). A response ends at
        EOS / a stop token (included, mask 1), right after a stop string, on repetition,
        at max_new_tokens, or where position prompt_len + t reaches the model's context.
        """
        return generate_in_eval_mode(self, prompts, params)

    def generate_cached(
        self, prompts: list[list[int]], params: SamplingParams, caches: list[RowCache] | None = None
    ) -> tuple[Rollout, list[RowCache | None]]:
        """`generate`, also returning each row's keys/values so that a later call continues
        from them instead of re-encoding (multi-turn rollouts, engines/rollout/native_cache.py).

        caches None: as `generate`. Otherwise one RowCache per prompt (params.n must be 1)
        whose ids are a prefix of that prompt: only the rest of the prompt is pre-filled.
        Returns the Rollout and, per row, a RowCache covering its prompt and all but the
        last sampled token (None for a row not finished by "stop": nothing continues it).
        """
        return generate_in_eval_mode(self, prompts, params, caches=caches, keep_cache=True)

    # -- the sampler -----------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, caches=None, keep_cache=False):
        plans, final_norm = self._prepare_layers(), _norm_fn(self.inner.norm)
        if caches is None:
            state = self._prefill_prompts(prompt_ids, params, plans, final_norm)
        else:
            if params.n != 1:
                raise ModelError("generate_cached: continuing from caches needs SamplingParams.n == 1")
            state = prefill_continue(self, prompt_ids, caches, params, plans, final_norm)
        ro, kept = self._decode(state, prompt_ids, params, plans, final_norm, keep_cache)
        return (ro, kept) if keep_cache else ro

    def _limits(self, lens: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, int]:
        """New tokens allowed per row [B] (max_new_tokens, cut by the model's context) and their max."""
        limit = torch.full_like(lens, params.max_new_tokens)
        if self.context_length:
            limit = torch.minimum(limit, self.context_length - lens)
        return limit, int(limit.max())

    def _rotary(self, embeds: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables [S, D] for every position a call can reach, computed once; the sine
        carries rotate_half's sign so that the rotation is one roll (see _rope)."""
        cos_t, sin_t = self.inner.rotary_emb(embeds, torch.arange(S, device=embeds.device)[None])  # [1, S, D]
        half = cos_t.shape[-1] // 2
        return cos_t[0], torch.cat((-sin_t[0, :, :half], sin_t[0, :, half:]), dim=-1)

    def _empty_cache(self, B: int, S: int, dtype, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers, n_kv = self.inner.layers, self.config.num_key_value_heads
        shape = (B, n_kv, S, layers[0].self_attn.head_dim)
        return (
            [torch.empty(shape, dtype=dtype, device=device) for _ in layers],
            [torch.empty(shape, dtype=dtype, device=device) for _ in layers],
        )

    def _prefill_prompts(self, prompt_ids, params, plans, final_norm) -> Prefilled:
        inner, lm_head = self.inner, self.model.get_output_embeddings()
        device, dtype = lm_head.weight.device, lm_head.weight.dtype
        n = params.n
        B = len(prompt_ids) * n
        # Each distinct prompt is pre-filled once (RL asks for G samples of every prompt);
        # row r then copies the cache of prompt src[r].
        distinct: dict[tuple[int, ...], int] = {}
        src_list = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids for _ in range(n)]
        U = len(distinct)
        src = torch.tensor(src_list, device=device)  # [B]
        lens_u = torch.tensor([len(p) for p in distinct], device=device)  # [U]
        lens = lens_u[src]  # [B]
        P = int(lens_u.max())
        limit, T = self._limits(lens, params)
        S = P + T

        input_ids = torch.full((U, P), self.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(distinct):  # once per call, not per token
            input_ids[i, P - len(p) :] = torch.tensor(p, device=device)
        valid = torch.arange(P, device=device)[None, :] >= (P - lens_u)[:, None]  # [U, P] real token
        k_cache, v_cache = self._empty_cache(B, S, dtype, device)

        # Prefill: the distinct prompts at once, left-padded; positions count real tokens only.
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [U, P]
        causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()
        # Padding queries may attend to themselves so no softmax row is empty (an empty
        # row gives NaN, and NaN times a zero attention weight would leak into real rows).
        mask = (causal[None] & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        embeds = inner.embed_tokens(input_ids)  # [U, P, H]
        cos_t, sin_t = self._rotary(embeds, S)
        rows_of = src if U < B else None
        hidden = self._forward(
            plans,
            embeds,
            cos_t[positions],
            sin_t[positions],
            _additive(mask[:, None], dtype),
            k_cache,
            v_cache,
            0,
            rows_of,
        )
        logits = lm_head(final_norm(hidden[:, -1]))  # [U, V]
        if rows_of is not None:
            logits = logits.index_select(0, rows_of)  # [B, V]

        # Decode-time additive mask, built once: -inf on each row's left padding, 0 elsewhere
        # (every generated slot of a row in the batch is real). One copy per KV head so that
        # a [b * Hkv, 1, L] view feeds the batched attention matmul directly.
        pad = torch.arange(P, device=device)[None, :] < (P - lens)[:, None]  # [B, P]
        step_mask = torch.zeros((B, self.config.num_key_value_heads, 1, S), dtype=dtype, device=device)
        step_mask[..., :P].masked_fill_(pad[:, None, None, :], float("-inf"))
        return Prefilled(logits, k_cache, v_cache, step_mask, lens, limit, P, T, cos_t, sin_t)

    def _decode(self, state: Prefilled, prompt_ids, params, plans, final_norm, keep_cache: bool):
        """Sample from a pre-filled state; (Rollout, per-row RowCache list or None)."""
        inner, lm_head = self.inner, self.model.get_output_embeddings()
        device = lm_head.weight.device
        n, n_kv = params.n, self.config.num_key_value_heads
        logits, k_cache, v_cache, step_mask = state.logits, state.k_cache, state.v_cache, state.step_mask
        P, T, cos_t, sin_t = state.P, state.T, state.cos_t, state.sin_t
        B = logits.shape[0]
        generator = make_generator(params.seed, device)
        stop_ids = eos_ids(self.tokenizer, self.config, params)
        V = logits.shape[-1]
        tracker = FinishTracker(params, stop_ids, V, self.tokenizer, device)
        # Row B is scratch: slots whose sequence finished write there until they are evicted.
        out_ids = torch.full((B + 1, T), self.pad_id, dtype=torch.long, device=device)
        out_lp = torch.zeros((B + 1, T), dtype=torch.float32, device=device)
        out_keep = (
            torch.zeros((B + 1, T, V), dtype=torch.bool, device=device) if params.return_keep_mask else None
        )
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        codes = torch.zeros(B, dtype=torch.long, device=device)
        b = B  # batch slots in use; slot i holds row rows[i]
        rows = torch.arange(B, device=device)
        live = torch.ones(B, dtype=torch.bool, device=device)  # [b] slot's sequence still running
        dest = rows  # [b] output row of each slot: its row while live, scratch row B after
        slot_lens, slot_limit = state.lens, state.limit
        kept = [None] * B if keep_cache else None

        def keep(slots: torch.Tensor) -> None:  # save finished rows' caches before their slots go
            save_row_caches(kept, slots, rows, codes, lengths, state, out_ids, prompt_ids, n)

        for t in range(T):
            uniforms = None
            if params.temperature > 0:  # one draw per original row, whatever the batch holds now
                uniforms = torch.rand(B, generator=generator, dtype=cdf_dtype(device), device=device)  # [B]
                uniforms = uniforms if b == B else uniforms[rows]
            tokens, lp, keep_t = sample_tokens(logits, params, generator, uniforms)  # [b], [b], [b, V]|None
            out_ids[dest, t] = tokens
            out_lp[dest, t] = lp
            if out_keep is not None:
                out_keep[dest, t] = keep_t if keep_t is not None else True
            history = out_ids[dest, : t + 1] if tracker.needs_history else None  # [b, t+1]
            code = tracker.step(history, tokens, slot_limit <= t + 1)  # [b]
            done = (code != RUNNING) & live
            if bool(done.any()):
                finished = rows[done]
                codes[finished], lengths[finished] = code[done], t + 1
                live = live & ~done
                n_live = int(live.sum())
                if n_live == 0:
                    break
                if (b - n_live) * EVICT_FRACTION >= b:
                    if kept is not None:
                        keep((~live).nonzero().squeeze(-1))
                    keep_slots = live.nonzero().squeeze(-1)
                    written = P + t  # cache slots filled so far
                    for cache in (*k_cache, *v_cache):  # in place: buffers keep capacity B
                        cache[:n_live, :, :written] = cache[keep_slots, :, :written]
                    b = n_live
                    rows, live, tokens = rows[keep_slots], live[keep_slots], tokens[keep_slots]
                    slot_lens, slot_limit = slot_lens[keep_slots], slot_limit[keep_slots]
                    step_mask[:b] = step_mask[keep_slots]
                dest = torch.where(live, rows, B)
            slot = P + t
            pos = (slot_lens + t)[:, None]  # [b, 1]
            hidden = self._forward(
                plans,
                inner.embed_tokens(tokens[:, None]),
                cos_t[pos],
                sin_t[pos],
                step_mask[:b, :, :, : slot + 1].reshape(b * n_kv, 1, slot + 1),
                [c[:b] for c in k_cache],
                [c[:b] for c in v_cache],
                slot,
            )
            logits = lm_head(final_norm(hidden[:, -1]))  # [b, V]
        else:
            lengths[rows[live]] = T
            codes[rows[live]] = LENGTH  # unreachable in practice: every row finishes by its limit
        if kept is not None:
            keep(torch.arange(b, device=device))

        steps = int(lengths.max())
        ro = assemble_rollout(
            self,
            prompt_ids,
            n,
            out_ids[:B, :steps],
            lengths,
            out_lp[:B, :steps],
            codes,
            params,
            stop_ids,
            out_keep[:B, :steps] if out_keep is not None else None,
        )
        return ro, kept

    def _prepare_layers(self) -> list[dict]:
        """Per-layer callables for this generate call, with fused projections where possible.

        When q/k/v (and gate/up) are plain `nn.Linear`s their weights are concatenated once
        per call (a copy of the attention/MLP input weights, tiny next to generation), so
        a decode step runs 4 matmuls per layer instead of 7: small models on CPU are
        bound by per-op overhead, not FLOPs. Re-fusing on every call keeps the engine in
        step with training. LoRA-wrapped or otherwise custom projections are called as
        modules instead.
        """
        plans = []
        for layer in self.inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            plan = {
                "attn": attn,
                "layer": layer,
                "ln1": _norm_fn(layer.input_layernorm),
                "ln2": _norm_fn(layer.post_attention_layernorm),
            }
            projs = [attn.q_proj, attn.k_proj, attn.v_proj]
            if all(type(m) is nn.Linear for m in projs):
                w = torch.cat([m.weight for m in projs])
                b = torch.cat([m.bias for m in projs]) if all(m.bias is not None for m in projs) else None
                sizes = [m.out_features for m in projs]
                plan["qkv"] = lambda h, w=w, b=b, sizes=sizes: F.linear(h, w, b).split(sizes, dim=-1)
                plan["fused_qkv"] = (w, b, sizes[0] // attn.head_dim, sizes[1] // attn.head_dim)
            else:
                plan["qkv"] = lambda h, ps=projs: (ps[0](h), ps[1](h), ps[2](h))
            plan["o_proj"] = _linear_fn(attn.o_proj)
            gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
            down = _linear_fn(down)
            if all(type(m) is nn.Linear for m in (gate, up)) and gate.bias is None and up.bias is None:
                w_gu, act, size = torch.cat([gate.weight, up.weight]), mlp.act_fn, gate.out_features

                silu = type(act).__name__ in ("SiLU", "SiLUActivation")  # both are F.silu

                def mlp_fn(h, w_gu=w_gu, act=act, down=down, size=size, silu=silu):
                    g, u = F.linear(h, w_gu).split(size, dim=-1)
                    if silu:  # in place: two fewer [b, q, I] buffers per layer
                        return down(F.silu(g, inplace=True).mul_(u))
                    return down(act(g) * u)

                plan["mlp"] = mlp_fn
            else:
                plan["mlp"] = mlp
            plans.append(plan)
        return plans

    def _forward(
        self,
        plans,
        x,
        cos,
        sin,
        mask,
        k_cache,
        v_cache,
        start: int,
        rows_of: torch.Tensor | None = None,
        chunk: bool = False,
    ) -> torch.Tensor:
        """Run the decoder layers on x [b, q, H] whose tokens go to cache slots start..start+q-1.

        start == 0 is the prefill: attention over the q tokens themselves, mask [b, 1, q, q]
        additive; the cache receives row rows_of[r] of the keys/values as its row r
        (rows_of [B] long, None: row r itself). start > 0 is a decode step (q == 1) over
        the cache, mask [b * Hkv, 1, start + 1] additive, unless `chunk`: then the q tokens
        attend over the cache slots 0..start+q-1 (theirs included), mask [b, 1, q, start + q]
        additive (a continuation's pre-fill, native_cache.py). cos/sin: [b, q, D] rotary
        tables at the tokens' positions (sin sign-folded, see _rope). Returns the last
        layer's hidden states [b, q, H] (before the final norm).
        """
        b, q, _ = x.shape
        end = start + q
        for i, plan in enumerate(plans):
            attn = plan["attn"]
            hd = attn.head_dim
            fused = plan.get("fused_qkv")
            if fused is not None and not hasattr(attn, "q_norm"):
                # One matmul, one rotary pass over the q and k heads together, views for the rest.
                w, bias, n_q, n_k = fused
                heads = (
                    F.linear(plan["ln1"](x), w, bias).view(b, q, -1, hd).transpose(1, 2)
                )  # [b, Hq+2Hkv, q, D]
                qk = _rope(heads[:, : n_q + n_k], cos, sin)
                qs, ks, vs = qk[:, :n_q], qk[:, n_q:], heads[:, n_q + n_k :]
            else:
                qs, ks, vs = plan["qkv"](plan["ln1"](x))
                qs, ks = qs.view(b, q, -1, hd), ks.view(b, q, -1, hd)
                vs = vs.view(b, q, -1, hd).transpose(1, 2)
                if hasattr(attn, "q_norm"):  # Qwen3 normalises q/k per head before rotary
                    qs, ks = attn.q_norm(qs), attn.k_norm(ks)
                qs = _rope(qs.transpose(1, 2), cos, sin)  # [b, H, q, D]
                ks = _rope(ks.transpose(1, 2), cos, sin)  # [b, Hkv, q, D]
            n_heads, n_kv = qs.shape[1], ks.shape[1]
            if chunk:
                k_cache[i][:, :, start:end] = ks
                v_cache[i][:, :, start:end] = vs
                o = F.scaled_dot_product_attention(
                    qs, k_cache[i][:, :, :end], v_cache[i][:, :, :end], attn_mask=mask,
                    scale=attn.scaling, enable_gqa=n_heads != n_kv,
                )  # fmt: skip
                o = o.transpose(1, 2).reshape(b, q, n_heads * hd)
            elif start == 0:
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=mask, scale=attn.scaling, enable_gqa=n_heads != n_kv
                )
                o = o.transpose(1, 2).reshape(b, q, n_heads * hd)
                if rows_of is not None:
                    ks, vs = ks.index_select(0, rows_of), vs.index_select(0, rows_of)
                k_cache[i][:, :, :end] = ks
                v_cache[i][:, :, :end] = vs
            else:
                k_cache[i][:, :, start:end] = ks
                v_cache[i][:, :, start:end] = vs
                o = _decode_attention(qs, k_cache[i][:, :, :end], v_cache[i][:, :, :end], mask, attn.scaling)
            x = x + plan["o_proj"](o)
            x = x + plan["mlp"](plan["ln2"](x))
        return x


def _decode_attention(
    qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one new token per row over its cache: returns [b, 1, H * D].

    qs [b, H, 1, D]; keys / values [b, Hkv, L, D] (views of the cache); mask [b * Hkv, 1, L]
    additive. The H / Hkv query heads sharing a KV head become that head's "query rows",
    so GQA repeats no keys, and two batched matmuls replace SDPA, whose CPU flash kernel
    costs ~3x more for a single query (tiling built for long queries).
    """
    b, n_heads, _, hd = qs.shape
    n_kv, L = keys.shape[1], keys.shape[2]
    grouped = qs.reshape(b * n_kv, n_heads // n_kv, hd)  # [b*Hkv, H/Hkv, D]
    scores = torch.baddbmm(mask, grouped, keys.reshape(b * n_kv, L, hd).transpose(1, 2), alpha=scale)
    o = torch.bmm(scores.softmax(-1), values.reshape(b * n_kv, L, hd))  # [b*Hkv, H/Hkv, D]
    return o.view(b, 1, n_heads * hd)


def _linear_fn(module: nn.Module):
    """A plain nn.Linear as a bare F.linear call (skips Module.__call__'s hooks machinery,
    a few us per call, hundreds of calls per generate); anything else (LoRA, ...) as is."""
    if type(module) is not nn.Linear:
        return module
    return lambda h, w=module.weight, b=module.bias: F.linear(h, w, b)


def _norm_fn(norm: nn.Module):
    """HF RMSNorm as one fused op when it is the standard one (same formula), else the module."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if (
        eps is None
        or weight is None
        or type(norm).__name__ not in ("Qwen2RMSNorm", "LlamaRMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
    ):
        return norm
    if weight.dtype != torch.float32:
        return norm  # HF normalises in float32 then casts; keep its exact order for low precision
    return lambda x: F.rms_norm(x, (x.shape[-1],), weight, eps)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool attend-mask -> additive float mask (built once per step, shared by all layers)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
