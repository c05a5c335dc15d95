"""Models, tokenizers, the training log-prob forward and rollout engines.

- `models`: presets, HF load/save, scalar-head (critic / reward) models.
- `tokenizer`: the character-level tokenizer of the synthetic tasks.
- `batching`: prompt + response packing shared by training and scoring.
- `logprobs`: micro-batched per-token log-probs, entropy and values.
- `rollout`: `make_engine("native" | "hf" | "vllm", model, tokenizer)`.
"""
