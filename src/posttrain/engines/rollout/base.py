"""The rollout contract shared by every engine (native, hf, vllm) and the RL loop.

Shapes: B = sequences (prompts x n), P = longest prompt, T = longest response, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """How to sample. Defaults are plain ancestral sampling at temperature 1.

    temperature: 0 means greedy. The same temperature must be used by the training
        log-prob forward so that sampler and trainer log-probs agree.
    top_p / top_k: nucleus / top-k truncation; 1.0 / 0 disable them.
    max_new_tokens: cap on response length; sequences hitting it finish with "length".
    stop_token_ids: token ids that end a sequence (the EOS id is always added by engines).
    stop_strings: decoded text that ends a sequence; the response is cut right after it.
    n: samples per prompt; group_id in the Rollout links them.
    seed: same seed + same prompts + same weights -> same samples.
    return_keep_mask: also return the boolean top-p/top-k support per step (DeepSeek-V3.2
        "keep sampling mask") as Rollout.keep_mask [B, T, V].
    repetition_ngram / repetition_max_repeats: stop a sequence whose last
        `repetition_ngram`-gram has occurred `repetition_max_repeats` times (Kimi k1.5
        early stop); finish reason "repetition". 0 disables it.
    ignore_eos: keep generating past EOS (only `stop_token_ids` / stop strings / length
        end a sequence) — for throughput benchmarks with random-init models.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    return_keep_mask: bool = False
    repetition_ngram: int = 0
    repetition_max_repeats: int = 4
    ignore_eos: bool = False


@dataclass
class Rollout:
    """A batch of sampled responses, right-padded.

    prompt_ids: list of B prompt token-id lists (unpadded; prompt i // n for sample i).
    response_ids: [B, T] long, padded with pad_token_id after the end.
    mask: [B, T] float, 1 where a response token counts (including a final EOS token).
    sampling_logprobs: [B, T] float32, the sampler's log-prob of each chosen token
        under the temperature-scaled (and, if used, top-p/top-k renormalized) distribution.
    finish_reason: B strings among "stop" (EOS or stop token/string), "length",
        "repetition".
    group_id: [B] long, index of the prompt each sample came from.
    texts: B decoded response strings (stop strings included, padding excluded).
    keep_mask: [B, T, V] bool when requested, else None (what engines return).
    keep_ids: [B, T, K] long, the same support as kept token ids padded with −1: the compact
        form the Generator role (roles/generator.py) hands on instead of keep_mask.
    turn_rewards: [B, T] float, multi-turn rollouts only: each environment turn's reward
        at the last token of the model turn it answered (None: single turn).
    turn_stats: multi-turn rollouts only: per-sample lists "turns", "tool_calls",
        "tool_errors" and "return" (the environment's summed rewards) (None: single turn).
    versions: [B, T] long, the policy version that sampled each response token; padding
        positions hold the version of the sample's last token. Set by partial rollouts
        (engines/rollout/segments.py); None from a whole generation (every token is at the
        generator's one version).
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    finish_reason: list[str]
    group_id: torch.Tensor
    texts: list[str]
    keep_mask: torch.Tensor | None = None
    keep_ids: torch.Tensor | None = None
    turn_rewards: torch.Tensor | None = None
    turn_stats: dict[str, list[float]] | None = None
    versions: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns prompts into a Rollout and can take new weights."""

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights (no-op when the engine shares the module)."""
        ...
