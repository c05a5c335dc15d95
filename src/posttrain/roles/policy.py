"""The policy model's forward: log-probs of responses, with or without grad.

Used by the policy learner (roles/learner.py), which owns the model and its optimizer."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from posttrain.core.logprobs import entropy_from_logits, logprobs_from_logits
from posttrain.engines.batching import SequenceBatch, to_model_device
from posttrain.engines.logprobs import response_logits, sequence_logprobs
from posttrain.roles.batch import keep_mask_from_ids


def _support_logprobs(
    model: torch.nn.Module, seq: SequenceBatch, keep_ids: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs renormalised over the sampler's kept top-p/top-k support (DeepSeek-V3.2).

    keep_ids: [B, T, K] long kept token ids (−1 padding, RLBatch.keep_ids), expanded here to
    the [B, T, V] bool mask, so the full mask exists only for this forward. Tokens outside
    the support get −inf logits, so the trainer's distribution is the same truncated one
    the sampler drew from. Materialises [B, T, V] logits: keep micro-batches small.
    """
    seq, home = to_model_device(model, seq)  # results come back on the batch's device
    logits = response_logits(model, seq).float() / temperature  # [B, T, V]
    keep_mask = keep_mask_from_ids(keep_ids.to(logits.device), logits.shape[-1])
    logits = logits.masked_fill(~keep_mask, float("-inf"))
    tokens = seq.response_ids
    logprobs = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits.masked_fill(~keep_mask, -1e30)) if entropy else None
    return logprobs.to(home), (ent.to(home) if ent is not None else None)


class PolicyRole:
    """The trained causal LM. `logprobs` is the only forward the loop calls on it.

    temperature: the sampler's τ (trainer and sampler must score the same distribution).
    micro_batch_size: rows per no-grad scoring forward (None = engine's automatic choice).
    """

    def __init__(self, model: torch.nn.Module, *, temperature: float, micro_batch_size: int | None = None):
        self.model = model
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size

    def logprobs(
        self,
        seq: SequenceBatch,
        *,
        with_grad: bool = False,
        return_entropy: bool = False,
        keep_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, T] log π_θ of the responses (and [B, T] entropy if asked).

        keep_ids: [B, T, K] the sampler's kept support (RLBatch.keep_ids) or None for the
        full vocabulary.
        """
        if keep_ids is not None:
            ctx = nullcontext() if with_grad else torch.no_grad()
            with ctx:
                return _support_logprobs(self.model, seq, keep_ids, self.temperature, return_entropy)
        return sequence_logprobs(
            self.model,
            seq,
            temperature=self.temperature,
            micro_batch_size=None if with_grad else self.micro_batch_size,
            return_entropy=return_entropy,
            with_grad=with_grad,
        )
