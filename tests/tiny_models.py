"""Small Hugging Face models with random weights and scripted rollouts, shared by tests in
several folders.

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


def scripted_rollout(prompts: list[list[int]], n: int, rows: list[list[int]], texts: list[str]):
    """The Rollout a scripted engine returns: `rows` (token ids, n per prompt, prompt-major)
    right-padded with 0, mask 1 on their tokens, sampling log-prob −1 per token, every
    sample finished by "stop"."""
    from posttrain.engines.rollout.base import Rollout

    T = max(map(len, rows))
    ids, mask = torch.zeros((len(rows), T), dtype=torch.long), torch.zeros((len(rows), T))
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
    return Rollout([list(p) for p in prompts for _ in range(n)], ids, mask, -mask, ["stop"] * len(rows),
                   torch.arange(len(prompts)).repeat_interleave(n), texts)  # fmt: skip
