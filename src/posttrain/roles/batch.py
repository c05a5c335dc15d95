"""`RLBatch`: one step's rollouts and everything computed from them, as plain tensors.

What crosses a role's interface (DESIGN.md §2a), so it must pickle: tensors, lists of
strings, a SequenceBatch of tensors. No model handles, no callables.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from posttrain.engines.batching import SequenceBatch


@dataclass
class RLBatch:
    """One step's rollouts and everything computed from them. B sequences, T tokens.

    seq: the packed SequenceBatch (input_ids [B, L] ...; seq.response_mask is the raw
        rollout mask). mask: [B, T] loss mask (rollout mask × filters: invalid rewards,
        overlong masking). sampling_logprobs: [B, T] the sampler's log-probs.
    group_id: [B] long, one id per prompt. scores: [B] summed reward (0 where invalid),
        valid: [B] bool. item_index: [B] long, index of the prompt in the PromptSource.
    keep_mask: [B, T, V] bool sampler support (DeepSeek-V3.2 keep sampling mask) or None.
    dense_rewards: [B, T] weighted dense rewards of dense reward specs (PRM step
        marginals at each step's last token), not in `scores`; None without such specs.
    Filled by the scoring passes when needed: old_logprobs, ref_logprobs, values,
    teacher_logprobs ([B, T]); then advantages, returns ([B, T]).
    """

    seq: SequenceBatch
    mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    group_id: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    item_index: torch.Tensor
    finish_reason: list[str]
    texts: list[str]
    keep_mask: torch.Tensor | None = None
    dense_rewards: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        """B, the number of sequences."""
        return self.mask.shape[0]

    def select(self, index: torch.Tensor) -> RLBatch:
        """Rows `index` ([k] long) of every per-sequence field (a minibatch / micro-batch)."""
        out = {}
        rows = index.tolist()
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, SequenceBatch):
                out[f.name] = v.select(index)
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in rows]
            else:
                out[f.name] = v[index]
        return replace(self, **out)
