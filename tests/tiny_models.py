"""Small Hugging Face models with random weights, shared by the engine and reward tests.

Not a test module: tests import it as `tiny_models` (tests/ is on pytest's pythonpath).
"""

from __future__ import annotations

import torch


def tiny_hf_kwargs(vocab_size: int, hidden_size: int = 64, intermediate_size: int = 128, **extra) -> dict:
    """Config keywords of a 2-layer model with 4 query / 2 key-value heads (GQA)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )


def small_family_model(kind: str, vocab_size: int) -> torch.nn.Module:
    """A seeded (0) Llama ("llama": no qkv bias) or Qwen3 ("qwen3": per-head q/k norm) model in
    eval mode, 64 wide, 128 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = tiny_hf_kwargs(vocab_size, max_position_embeddings=128)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)).eval()
