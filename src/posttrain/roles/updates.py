"""What every learner shares: its own optimizer, LR schedule, bad-step guard, and the
epochs × minibatches × micro-batches update loop (DESIGN.md §2 "learner").

`ModelLearner` is the base of `PolicyLearner` (roles/learner.py) and `CriticLearner`
(roles/critic.py). Each learner clips and guards its own gradients: the policy and the
critic are separate optimizers (as in verl and OpenRLHF), so one model's bad batch or
large gradient neither skips nor scales the other's update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from posttrain.roles.batch import RLBatch
from posttrain.train.common.optim import BadStepGuard, build_optimizer, build_scheduler, guarded_step

if TYPE_CHECKING:
    from posttrain.algos.spec import RLSpec
    from posttrain.train.config.rl import RLConfig

# (micro-batch, global counts, step) -> (loss to backward, {metric name: value})
MicroLoss = Callable[[RLBatch, dict, int], tuple[torch.Tensor, dict]]


def _f(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class ModelLearner:
    """A trained model with its own AdamW, LR schedule and bad-step guard.

    lr: this model's peak learning rate (the critic's may differ from optim.lr).
    The schedule spans cfg.steps × update_epochs × num_minibatches optimizer updates.
    """

    def __init__(self, model: torch.nn.Module, cfg: RLConfig, spec: RLSpec, *, lr: float):
        self.model = model
        self.cfg = cfg
        self.spec = spec
        self.optimizer = build_optimizer([{"params": self.parameters(), "lr": lr}], cfg.optim)
        self.updates_per_step = spec.update_epochs * spec.num_minibatches
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps * self.updates_per_step)
        self.guard = BadStepGuard(cfg.run.max_bad_steps)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors (LoRA: adapters only)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def lr(self) -> float:
        """The current learning rate (after the scheduler's last step)."""
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        """Model weights, optimizer, scheduler and guard: everything a resume needs."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])

    def checkpoint_parts(self, name: str) -> tuple[dict, dict, dict]:
        """({name: module}, {optimizer name: optimizer}, {scheduler name: scheduler}): what
        CheckpointManager writes for this in-process learner (the module in Hugging Face
        format). The policy's optimizer / scheduler keep the names "optimizer" /
        "scheduler" that checkpoints used before the learners split."""
        prefix = "" if name == "policy" else f"{name}_"
        return (
            {name: self.model},
            {f"{prefix}optimizer": self.optimizer},
            {f"{prefix}scheduler": self.scheduler},
        )

    def _updates(self, batch: RLBatch, step: int, micro_loss: MicroLoss) -> dict[str, float]:
        """Epochs × minibatches of guarded optimizer steps; micro-batches accumulate grads.

        Each minibatch's loss is aggregated with its GLOBAL token / sequence counts, so
        the accumulated gradient is the same for any micro-batch size (1×8 == 8×1). The
        minibatch order depends only on (run.seed, step), so every learner of one step
        visits the same minibatches. Returns the micro-batch mean of micro_loss's
        metrics, "loss/total" (mean over optimizer steps) and the train/* counters.
        """
        spec, cfg = self.spec, self.cfg
        B = len(batch)
        n_mb = min(spec.num_minibatches, B)
        gen = torch.Generator().manual_seed(cfg.run.seed * 100_003 + step)
        sums: dict[str, float] = {}
        n_metric = applied = skipped = empty = rolled_back = 0
        grad_norms = []
        for _epoch in range(spec.update_epochs):
            order = torch.randperm(B, generator=gen) if n_mb > 1 else torch.arange(B)
            for mb_idx in torch.tensor_split(order, n_mb):
                mb = batch.select(mb_idx)
                n_tok = _f(mb.mask.sum())
                if n_tok == 0:  # all-masked minibatch: loss 0, nothing to learn, no step
                    empty += 1
                    continue
                counts = {
                    "num_tokens": n_tok,
                    "num_seqs": _f((mb.mask.sum(-1) > 0).sum()),
                    "max_len": cfg.rollout.max_new_tokens,
                }
                micro = cfg.algo.micro_batch_size or len(mb)
                total = torch.zeros(())
                for mi_idx in torch.arange(len(mb)).split(micro):
                    loss, m = micro_loss(mb.select(mi_idx), counts, step)
                    loss.backward()
                    total = total + loss.detach()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + _f(v)
                    n_metric += 1
                sums["loss/total"] = sums.get("loss/total", 0.0) + _f(total)
                result = guarded_step(
                    self.parameters(), self.optimizer, self.scheduler, cfg.optim.max_grad_norm, loss=total,
                    max_update_ratio=cfg.optim.max_update_ratio,
                )  # fmt: skip
                grad_norms.append(result.grad_norm)
                applied += result.ok
                skipped += not result.ok
                rolled_back += result.rolled_back
                self.guard.update(result, step)
        out = {k: v / max(1, n_metric) for k, v in sums.items() if k != "loss/total"}
        out["loss/total"] = sums.get("loss/total", 0.0) / max(1, applied + skipped)
        finite = [g for g in grad_norms if math.isfinite(g)]
        out.update(
            {
                "train/updates": applied,
                "train/skipped_updates": skipped,
                "train/rolled_back_updates": rolled_back,
                "train/skipped_total": self.guard.total,
                "train/empty_minibatches": empty,
                "train/grad_norm": sum(finite) / len(finite) if finite else float("nan"),
                "train/lr": self.lr(),
            }
        )
        return out
