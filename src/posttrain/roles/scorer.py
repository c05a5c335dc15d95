"""Scorers: frozen models that score tokens (reference policy, teacher).

Under torch.distributed (N > 1 processes) a scorer's own module is sharded with FSDP2
(`ScoringRole.shard`: no optimizer, no gradients): every rank holds 1/N of its weights and
every rank runs the same scoring forward on the same global batch, the layers gathering
their weights as they run. One process never shards anything.
"""

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
        self.sharded = False

    def shard(self) -> None:
        """Shard the frozen module with FSDP2 across the process group (a collective, on every
        rank alike). From then on `logprobs` and `refresh_from` are collectives too: every
        rank calls them with the same batch / weights."""
        from posttrain.engines import distributed as dist

        if self.disable_adapter:
            raise TrainingError("a LoRA reference is the policy with adapters off: shard the policy instead")
        dist.shard_model(self.model)
        self.sharded = True

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
        (the periodic π_ref reset). Sharded: `weights` holds the full state on every rank and
        each rank keeps its own shards of it."""
        if self.disable_adapter:
            raise TrainingError("a LoRA reference (adapters off) cannot be refreshed from the policy")
        if self.sharded:
            from posttrain.engines import distributed as dist

            dist.load_full_model_state(self.model, weights.state_dict())
        else:
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
