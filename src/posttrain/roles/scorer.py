"""Scorers: frozen models that score tokens (reference policy, teacher)."""

from __future__ import annotations

from contextlib import nullcontext
from copy import deepcopy

import torch

from posttrain.engines.batching import SequenceBatch
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.errors import TrainingError
from posttrain.roles.weights import WeightSource


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
    def reference_for(cls, policy: torch.nn.Module, temperature: float, *, copy: bool = True) -> ScoringRole:
        """π_ref = the initial policy: adapter-disabled under LoRA, else a frozen deep copy.

        copy=False: `policy` is a module of the reference's own (built for it in another
        process, train/rl/ray_backend.py), frozen in place instead of copied.
        """
        if hasattr(policy, "disable_adapter"):  # a PEFT model: the base weights ARE π_ref
            return cls(policy, temperature=temperature, disable_adapter=True)
        ref = (deepcopy(policy) if copy else policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return cls(ref, temperature=temperature)

    @torch.no_grad()
    def refresh_from(self, weights: WeightSource) -> None:
        """Copy the policy's weights (`PolicyLearner.weights()`) into this frozen model
        (the periodic π_ref reset)."""
        if self.disable_adapter:
            raise TrainingError("a LoRA reference (adapters off) cannot be refreshed from the policy")
        self.model.load_state_dict(weights.state_dict())

    @torch.no_grad()
    def logprobs(self, seq: SequenceBatch, micro_batch_size: int | None = None) -> torch.Tensor:
        """[B, T] log-probs of the batch's responses under this frozen model."""
        ctx = self.model.disable_adapter() if self.disable_adapter else nullcontext()
        with ctx:
            out, _ = sequence_logprobs(
                self.model, seq, temperature=self.temperature, micro_batch_size=micro_batch_size
            )
        return out
