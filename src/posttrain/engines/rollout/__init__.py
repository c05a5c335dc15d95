"""Rollout engines behind one interface (`RolloutEngine` in base.py).

    engine = make_engine("native", model, tokenizer)
    rollout = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, seed=0))
    ...train...
    engine.sync_weights(model)   # no-op for native / hf (they share the module)

native: our batched KV-cache sampler (Llama/Qwen2 family; the CPU default).
hf:     transformers generate (any architecture).
vllm:   in-process vLLM (GPU, optional extra), weights pushed by sync_weights.
"""

from __future__ import annotations

from torch import nn

from posttrain.core.registry import Registry
from posttrain.engines.rollout.base import Rollout, RolloutEngine, SamplingParams

ENGINES: Registry = Registry("rollout engine")


@ENGINES.register("native")
def _native(model: nn.Module, tokenizer, **kw) -> RolloutEngine:
    from posttrain.engines.rollout.native import NativeEngine

    return NativeEngine(model, tokenizer, **kw)


@ENGINES.register("hf")
def _hf(model: nn.Module, tokenizer, **kw) -> RolloutEngine:
    from posttrain.engines.rollout.hf import HFEngine

    return HFEngine(model, tokenizer, **kw)


@ENGINES.register("vllm")
def _vllm(model: nn.Module, tokenizer, **kw) -> RolloutEngine:
    from posttrain.engines.rollout.vllm import VLLMEngine  # imports vllm lazily, clear error if absent

    return VLLMEngine(model, tokenizer, **kw)


def make_engine(name: str, model: nn.Module, tokenizer, **kw) -> RolloutEngine:
    """Build rollout engine `name` ("native" | "hf" | "vllm") over `model` and `tokenizer`.

    kw go to the engine's constructor (e.g. vllm's gpu_memory_utilization). An unknown
    name raises ConfigError listing the valid ones; an architecture the native engine
    cannot drive raises ModelError suggesting "hf".
    """
    return ENGINES[name](model, tokenizer, **kw)


__all__ = ["ENGINES", "Rollout", "RolloutEngine", "SamplingParams", "make_engine"]
