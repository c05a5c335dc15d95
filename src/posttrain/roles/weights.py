"""Weight sync between the policy learner and whatever samples from it (DESIGN.md §2a).

A `WeightSource` is what `PolicyLearner.weights()` hands out and what `Generator.sync`
and the reference refresh (`ScoringRole.refresh_from`) take: a policy version number and
the weights as a state dict. The controller never passes a live module between roles.

Two flavours:
  `SharedModule`: in process. It points at the learner's own module, so a generator whose
      engine samples from that very module (the native / hf engines) has nothing to copy,
      and `state_dict()` returns the module's tensors without a copy.
  `StateDictWeights`: a snapshot of the tensors. What a `SharedModule` becomes when it is
      pickled (a process boundary: torch.distributed, Ray), so the receiving side loads
      the weights into its own module.
"""

from __future__ import annotations

from typing import Protocol

import torch


class WeightSource(Protocol):
    """The policy's weights at one version.

    version: the number of `PolicyLearner.update` calls that produced these weights
        (0 = the initial policy).
    state_dict(): name -> tensor, the names of the policy module's own `state_dict()`.
    """

    version: int

    def state_dict(self) -> dict[str, torch.Tensor]: ...


class StateDictWeights:
    """A snapshot of the policy's weights: version and name -> tensor (detached)."""

    def __init__(self, version: int, tensors: dict[str, torch.Tensor]):
        self.version = version
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot's tensors (name -> tensor)."""
        return self.tensors


class SharedModule:
    """The policy module itself, for roles in the same process (no copy).

    `module` is the live module: only an in-process receiver compares it with its own
    (`Generator.sync` skips the load when its engine samples from this module). Pickling
    turns it into a `StateDictWeights` snapshot, which is what crossing a process boundary
    must do: the module stays with its learner.
    """

    def __init__(self, module: torch.nn.Module, version: int):
        self.module = module
        self.version = version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's current tensors (name -> detached tensor sharing storage)."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def __reduce__(self):
        return StateDictWeights, (self.version, {k: v.clone() for k, v in self.state_dict().items()})
