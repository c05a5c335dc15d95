"""Scorers: frozen models that score tokens (reference policy, teacher) and the critic."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from posttrain.engines.batching import SequenceBatch
from posttrain.engines.logprobs import sequence_logprobs, sequence_values
from posttrain.errors import TrainingError


class ScoringRole:
    """A frozen model that scores tokens: the reference policy or the teacher.

    Built either from its own module (a frozen copy / a loaded teacher) or, for a LoRA
    policy, as "the policy with its adapters disabled" (no second copy of the weights).
    """

    def __init__(self, model: torch.nn.Module, *, temperature: float, disable_adapter: bool = False):
        self.model = model
        self.temperature = temperature
        self.disable_adapter = disable_adapter

    @classmethod
    def reference_for(cls, policy: torch.nn.Module, temperature: float) -> ScoringRole:
        """π_ref = the initial policy: adapter-disabled under LoRA, else a frozen deep copy."""
        if hasattr(policy, "disable_adapter"):  # a PEFT model: the base weights ARE π_ref
            return cls(policy, temperature=temperature, disable_adapter=True)
        ref = copy.deepcopy(policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return cls(ref, temperature=temperature)

    @torch.no_grad()
    def refresh_from(self, policy: torch.nn.Module) -> None:
        """Copy `policy`'s current weights into this frozen model (periodic π_ref reset)."""
        if self.disable_adapter:
            raise TrainingError("a LoRA reference (adapters off) cannot be refreshed from the policy")
        self.model.load_state_dict(policy.state_dict())

    @torch.no_grad()
    def logprobs(self, seq: SequenceBatch, micro_batch_size: int | None = None) -> torch.Tensor:
        """[B, T] log-probs of the batch's responses under this frozen model."""
        ctx = self.model.disable_adapter() if self.disable_adapter else nullcontext()
        with ctx:
            out, _ = sequence_logprobs(
                self.model, seq, temperature=self.temperature, micro_batch_size=micro_batch_size
            )
        return out


class CriticRole:
    """The value model V(s_t) (a ScalarHeadModel), trained alongside the policy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def parameters(self) -> list[torch.nn.Parameter]:
        """The critic's trainable tensors."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def values(self, seq: SequenceBatch, *, with_grad: bool = False) -> torch.Tensor:
        """[B, T] values of the state before each response token (logprob alignment)."""
        return sequence_values(self.model, seq, with_grad=with_grad)
