"""The critic learner: the value model V(s_t), its own optimizer, and its update.

Split from the policy's optimizer (as verl and OpenRLHF do): AdamW is per-parameter, so
the only difference from one joint optimizer is that gradient-norm clipping and the
bad-step guard act on each model alone. Its learning rate is critic.lr (else optim.lr).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.algos.critic import critic_objective
from posttrain.engines.batching import SequenceBatch
from posttrain.engines.logprobs import sequence_values
from posttrain.roles.batch import RLBatch
from posttrain.roles.updates import ModelLearner

if TYPE_CHECKING:
    from posttrain.algos.spec import RLSpec
    from posttrain.train.config.rl import RLConfig

# The update loop's train/* counters, reported under critic/* (train/* are the policy's).
_RENAMED = {
    "train/grad_norm": "critic/grad_norm",
    "train/lr": "critic/lr",
    "train/updates": "critic/updates",
    "train/skipped_updates": "critic/skipped_updates",
    "train/rolled_back_updates": "critic/rolled_back_updates",
    "train/skipped_total": "critic/skipped_total",
    "train/empty_minibatches": "critic/empty_minibatches",
}


class CriticLearner(ModelLearner):
    """The value model (a ScalarHeadModel) with its own AdamW, schedule and guard."""

    def __init__(self, model: torch.nn.Module, cfg: RLConfig, spec: RLSpec, *, dp=None):
        super().__init__(model, cfg, spec, lr=cfg.critic.lr or cfg.optim.lr, dp=dp)

    def values(self, seq: SequenceBatch, *, with_grad: bool = False) -> torch.Tensor:
        """[B, T] values of the state before each response token (logprob alignment)."""
        return sequence_values(self.model, seq, with_grad=with_grad)

    def save_pretrained(self, path: Path, tokenizer) -> None:
        """Export the value model (backbone + scalar head) with the tokenizer to `path`."""
        from posttrain.engines.models import save_value_model

        module = self.export_module()  # under torch.distributed: rank 0 writes
        if module is not None:
            save_value_model(module, tokenizer, str(path))

    def update(self, batch: RLBatch, step: int) -> dict[str, float]:
        """Value-loss updates on `batch` (old values and returns filled) over the same
        epochs × minibatches order as the policy learner's. Returns value/* metrics,
        "loss/total" (the value loss per optimizer step) and critic/* counters."""
        out = self._updates(batch, step, self._micro_loss)
        return {_RENAMED.get(k, k): v for k, v in out.items()}

    def _micro_loss(self, mi: RLBatch, counts: dict[str, float], step: int) -> tuple[torch.Tensor, dict]:
        """Value loss of one micro-batch (global counts, see ModelLearner._updates)."""
        spec = self.spec
        values = self.values(mi.seq, with_grad=True)
        return critic_objective(
            values,
            mi.values,
            mi.returns,
            mi.mask,
            value_coef=spec.value_coef,
            clip_range=spec.value_clip,
            aggregation=spec.aggregation,
            **counts,
        )
