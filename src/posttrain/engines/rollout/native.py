"""The native rollout engine: a batched sampler with a preallocated KV cache.

It drives the Hugging Face Llama/Qwen2 modules directly (embedding, each layer's norms,
projections and MLP, the rotary embedding, the LM head) instead of going through
`generate`, which removes the per-step overhead that dominates small models on CPU:

- one preallocated KV cache [B, H_kv, P + T, D] per layer, written in place;
- grouped-query attention at decode time by viewing the H query heads as
  [H_kv, H / H_kv] "queries" of each KV head, so keys/values are never repeated;
- finished sequences leave the batch (cache rows compacted with one index_select), so
  compute follows the number of live sequences;
- no per-sequence Python work per token: sampling, stop tokens, repetition detection and
  bookkeeping are tensor ops; stop strings decode only the few rows whose newest token
  could complete one.

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
    check_params,
    encode_prompts,
    eos_ids,
    make_generator,
    sample_tokens,
)
from posttrain.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021) in the HF half-rotation layout; x [B, H, L, D], cos/sin [B, L, D]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


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
        check_params(params)
        prompt_ids = encode_prompts(prompts, self.tokenizer, self.context_length)
        was_training = self.model.training
        self.model.eval()  # dropout off while sampling; restored for the trainer below
        try:
            with torch.inference_mode():
                return self._generate(prompt_ids, params)
        finally:
            self.model.train(was_training)

    # -- the sampler -----------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        inner, lm_head = self.inner, self.model.get_output_embeddings()
        device = lm_head.weight.device
        n = params.n
        rows = [p for p in prompt_ids for _ in range(n)]
        B = len(rows)
        lens = torch.tensor([len(p) for p in rows], device=device)  # [B]
        P = int(lens.max())
        limit = torch.full((B,), params.max_new_tokens, device=device)  # [B] new tokens allowed
        if self.context_length:
            limit = torch.minimum(limit, self.context_length - lens)
        T = int(limit.max())
        S = P + T

        input_ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(rows):  # once per call, not per token
            input_ids[i, P - len(p) :] = torch.tensor(p, device=device)
        valid = torch.zeros((B, S), dtype=torch.bool, device=device)  # [B, S] key slot holds a real token
        valid[:, :P] = torch.arange(P, device=device)[None, :] >= (P - lens)[:, None]

        layers = inner.layers
        attn0 = layers[0].self_attn
        n_kv = self.config.num_key_value_heads
        head_dim = attn0.head_dim
        dtype = lm_head.weight.dtype
        k_cache = [torch.empty((B, n_kv, S, head_dim), dtype=dtype, device=device) for _ in layers]
        v_cache = [torch.empty((B, n_kv, S, head_dim), dtype=dtype, device=device) for _ in layers]

        # Prefill: all prompts at once, left-padded; positions count real tokens only.
        positions = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)  # [B, P]
        causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()
        # Padding queries may attend to themselves so no softmax row is empty (an empty
        # row gives NaN, and NaN times a zero attention weight would leak into real rows).
        mask = (causal[None] & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        plans = self._prepare_layers()
        final_norm = _norm_fn(inner.norm)
        embeds = inner.embed_tokens(input_ids)  # [B, P, H]
        # Rotary tables for every position this call can reach, computed once.
        cos_t, sin_t = inner.rotary_emb(embeds, torch.arange(S, device=device)[None])  # [1, S, D]
        cos_t, sin_t = cos_t[0], sin_t[0]
        hidden = self._forward(
            plans,
            embeds,
            cos_t[positions],
            sin_t[positions],
            _additive(mask[:, None], dtype),
            k_cache,
            v_cache,
            0,
        )
        logits = lm_head(final_norm(hidden[:, -1]))  # [B, V]

        generator = make_generator(params.seed, device)
        stop_ids = eos_ids(self.tokenizer, self.config, params)
        V = logits.shape[-1]
        tracker = FinishTracker(params, stop_ids, V, self.tokenizer, device)
        out_ids = torch.full((B, T), self.pad_id, dtype=torch.long, device=device)
        out_lp = torch.zeros((B, T), dtype=torch.float32, device=device)
        out_keep = (
            torch.zeros((B, T, V), dtype=torch.bool, device=device) if params.return_keep_mask else None
        )
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        codes = torch.zeros(B, dtype=torch.long, device=device)
        active = torch.arange(B, device=device)  # original row of each live sequence
        active_lens, active_limit = lens, limit

        for t in range(T):
            tokens, lp, keep = sample_tokens(logits, params, generator)  # [b], [b], [b, V]|None
            out_ids[active, t] = tokens
            out_lp[active, t] = lp
            if out_keep is not None:
                out_keep[active, t] = keep if keep is not None else True
            history = out_ids[active, : t + 1] if tracker.needs_history else None  # [b, t+1]
            code = tracker.step(history, tokens, active_limit <= t + 1)  # [b]
            done = code != RUNNING
            if done.any():
                finished = active[done]
                codes[finished], lengths[finished] = code[done], t + 1
                if bool(done.all()):
                    break
                keep_rows = (~done).nonzero().squeeze(-1)
                active, tokens = active[keep_rows], tokens[keep_rows]
                active_lens, active_limit = active_lens[keep_rows], active_limit[keep_rows]
                valid = valid[keep_rows]
                for i in range(len(layers)):  # leave the batch: compact every layer's cache
                    k_cache[i] = k_cache[i].index_select(0, keep_rows)
                    v_cache[i] = v_cache[i].index_select(0, keep_rows)
            slot = P + t
            valid[:, slot] = True
            pos = (active_lens + t)[:, None]  # [b, 1]
            hidden = self._forward(
                plans,
                inner.embed_tokens(tokens[:, None]),
                cos_t[pos],
                sin_t[pos],
                _additive(valid[:, None, None, : slot + 1], dtype),
                k_cache,
                v_cache,
                slot,
            )
            logits = lm_head(final_norm(hidden[:, -1]))  # [b, V]
        else:
            lengths[active] = T
            codes[active] = LENGTH  # unreachable in practice: every row finishes by its limit

        steps = int(lengths.max())
        return assemble_rollout(
            prompt_ids,
            n,
            out_ids[:, :steps],
            lengths,
            out_lp[:, :steps],
            codes,
            self.tokenizer,
            params,
            self.pad_id,
            stop_ids,
            out_keep[:, :steps] if out_keep is not None else None,
        )

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
            gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
            if all(type(m) is nn.Linear for m in (gate, up)) and gate.bias is None and up.bias is None:
                w_gu, act, size = torch.cat([gate.weight, up.weight]), mlp.act_fn, gate.out_features

                def mlp_fn(h, w_gu=w_gu, act=act, down=down, size=size):
                    g, u = F.linear(h, w_gu).split(size, dim=-1)
                    return down(act(g) * u)

                plan["mlp"] = mlp_fn
            else:
                plan["mlp"] = mlp
            plans.append(plan)
        return plans

    def _forward(self, plans, x, cos, sin, mask, k_cache, v_cache, start: int) -> torch.Tensor:
        """Run the decoder layers on x [b, q, H] whose tokens go to cache slots start..start+q-1.

        cos/sin: [b, q, D] rotary tables at the tokens' positions; mask: [b, 1, q|1, start+q]
        additive float mask (0 = attend, -inf = not). Returns the last layer's hidden
        states [b, q, H] (before the final norm).
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
            k_cache[i][:, :, start:end] = ks
            v_cache[i][:, :, start:end] = vs
            keys, values = k_cache[i][:, :, :end], v_cache[i][:, :, :end]
            n_heads, n_kv = qs.shape[1], keys.shape[1]
            if q == 1:
                # Decode: the H/Hkv query heads sharing a KV head become that head's
                # "query rows", so GQA needs no repeated keys/values.
                grouped = qs.reshape(b, n_kv, n_heads // n_kv, hd)
                o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=attn.scaling)
                o = o.reshape(b, 1, n_heads * hd)
            else:
                o = F.scaled_dot_product_attention(
                    qs, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=n_heads != n_kv
                )
                o = o.transpose(1, 2).reshape(b, q, n_heads * hd)
            x = x + attn.o_proj(o)
            x = x + plan["mlp"](plan["ln2"](x))
        return x


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
