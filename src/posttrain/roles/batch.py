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
    keep_ids: [B, T, K] long, the token ids of the sampler's kept support at each response
        position (DeepSeek-V3.2 keep sampling mask), padded with −1; K is the largest
        support in the batch. Compact form of the engine's [B, T, V] bool keep mask (V ≫ K
        under top-k / top-p), expanded back only inside the learner's micro-batch forward
        (`keep_mask_from_ids`). None without keep sampling masks.
    dense_rewards: [B, T] weighted dense rewards of dense reward specs (PRM step
        marginals at each step's last token), not in `scores`; None without such specs.
    versions: [B, T] long, the policy version (number of updates applied) that sampled
        each response token: the generator's version for whole generations, per segment
        with partial rollouts (train/rl/async_rollouts.py). None only for batches built
        outside `collect`.
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
    keep_ids: torch.Tensor | None = None
    dense_rewards: torch.Tensor | None = None
    versions: torch.Tensor | None = None
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


def keep_ids_from_mask(keep_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] bool keep mask -> [B, T, K] long kept token ids padded with −1.

    K = the largest support (kept-token count) at any position, at least 1. Ids are in
    increasing order; `keep_mask_from_ids` inverts this exactly.
    """
    counts = keep_mask.sum(-1)  # [B, T]
    k = max(1, int(counts.max())) if counts.numel() else 1
    # Kept ids sort first (descending on the bool), in increasing id order (stable sort).
    order = torch.sort(keep_mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :k]
    slots = torch.arange(k)  # [K]
    return torch.where(slots < counts[..., None], order, torch.full_like(order, -1))


def keep_mask_from_ids(keep_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, T, K] kept ids (−1 = padding) -> [b, T, V] bool keep mask on keep_ids' device."""
    b, t, _ = keep_ids.shape
    mask = torch.zeros(b, t, vocab_size + 1, dtype=torch.bool, device=keep_ids.device)
    # Padding (−1) lands in the extra last column, which is dropped.
    mask.scatter_(-1, keep_ids.where(keep_ids >= 0, vocab_size), True)
    return mask[..., :vocab_size]
