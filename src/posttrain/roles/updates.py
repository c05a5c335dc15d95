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

from posttrain.engines import distributed as dist
from posttrain.roles.batch import RLBatch
from posttrain.train.common.optim import BadStepGuard, build_optimizer, build_scheduler, guarded_step

if TYPE_CHECKING:
    from posttrain.algos.spec import RLSpec
    from posttrain.train.config.rl import RLConfig

# Loss-term metrics aggregated with the minibatch's GLOBAL counts: each micro-batch holds a
# partial sum, so they add up over micro-batches (and ranks) instead of being averaged.
SUMMED_METRICS = frozenset({"policy/loss", "kl/loss", "distill/k2", "value/loss"})

# (micro-batch, global counts, step) -> (loss to backward, {metric name: value})
MicroLoss = Callable[[RLBatch, dict, int], tuple[torch.Tensor, dict]]


def _f(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _my_micro_batches(n: int, micro: int | None, world: int, rank: int) -> list[torch.Tensor | None]:
    """Row indices of this rank's micro-batches of an n-row minibatch.

    One process: [0, n) in chunks of `micro` (None: one chunk). N ranks: rank r takes the
    r-th of N contiguous shares (sizes differ by <= 1) in chunks of `micro` (None: the
    whole share), padded with None to the count of the largest share, so every rank runs
    as many forward/backward passes as the others (FSDP2's collectives pair up).
    """
    if world == 1:
        return list(torch.arange(n).split(micro or max(1, n)))
    share = torch.tensor_split(torch.arange(n), world)[rank]
    largest = -(-n // world)
    size = micro or max(1, largest)
    chunks: list[torch.Tensor | None] = list(share.split(size)) if len(share) else []
    return chunks + [None] * (-(-largest // size) - len(chunks))


class ModelLearner:
    """A trained model with its own AdamW, LR schedule and bad-step guard.

    lr: this model's peak learning rate (the critic's may differ from optim.lr).
    The schedule spans cfg.steps × update_epochs × num_minibatches optimizer updates.
    dp: the model's FSDP2 wrapper (train/offline/dp.DataParallel) under torch.distributed,
    else None.
    """

    def __init__(self, model: torch.nn.Module, cfg: RLConfig, spec: RLSpec, *, lr: float, dp=None):
        self.model = model
        self.dp = dp  # under torch.distributed: the model is FSDP2-sharded (train/rl/dp.py)
        self.cfg = cfg
        self.spec = spec
        self.optimizer = build_optimizer([{"params": self.parameters(), "lr": lr}], cfg.optim)
        self.updates_per_step = spec.update_epochs * spec.num_minibatches
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps * self.updates_per_step)
        self.guard = BadStepGuard(cfg.run.max_bad_steps)

    def export_module(self) -> torch.nn.Module | None:
        """The model as one plain module for saving: itself in one process; under
        torch.distributed a gathered CPU copy on rank 0 and None elsewhere (a collective)."""
        if self.dp is None:
            return self.model
        weights = dist.full_model_state(self.model)
        return self.dp.full_copy(weights, "cpu") if dist.rank() == 0 else None

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
        visits the same minibatches. Returns micro_loss's metrics — those in
        SUMMED_METRICS summed over each minibatch's micro-batches (they are partial sums
        over global counts) and averaged over optimizer steps, the others averaged over
        micro-batches weighted by their token counts, so neither depends on the
        micro-batch size or the number of processes — "loss/total" (mean over optimizer
        steps) and the train/* counters.
        """
        spec, cfg = self.spec, self.cfg
        world, rank = dist.world_size(), dist.rank()
        B = len(batch)
        n_mb = min(spec.num_minibatches, B)
        gen = torch.Generator().manual_seed(cfg.run.seed * 100_003 + step)
        sums: dict[str, float] = {}
        n_metric = 0.0
        applied = skipped = empty = rolled_back = 0
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
                total = torch.zeros(())
                for mi_idx in _my_micro_batches(len(mb), cfg.algo.micro_batch_size, world, rank):
                    if mi_idx is None:  # this rank's share ran out: a zero-weight pass keeps
                        # FSDP2's collectives paired with the other ranks' passes
                        loss, _ = micro_loss(mb.select(torch.zeros(1, dtype=torch.long)), counts, step)
                        (loss * 0.0).backward()
                        continue
                    mi = mb.select(mi_idx)
                    loss, m = micro_loss(mi, counts, step)
                    # FSDP2 averages gradients over ranks; the loss is divided by the
                    # minibatch's global counts, so the sum is wanted: world · loss.
                    (loss * world if world > 1 else loss).backward()
                    total = total + loss.detach()
                    weight = _f(mi.mask.sum())
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + _f(v) * (1.0 if k in SUMMED_METRICS else weight)
                    n_metric += weight
                if world > 1:  # the minibatch loss over ranks: every rank's guard decides alike
                    total = torch.tensor(dist.all_reduce_sums([_f(total)])[0])
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
        if world > 1:  # metric sums and token weights over ranks (loss/total is global)
            keys = sorted(k for k in sums if k != "loss/total")
            reduced = dist.all_reduce_sums([float(n_metric), *(sums[k] for k in keys)])
            n_metric = reduced[0]
            sums.update(zip(keys, reduced[1:]))
        n_steps = max(1, applied + skipped)
        out = {
            k: v / (n_steps if k in SUMMED_METRICS else max(n_metric, 1e-12))
            for k, v in sums.items()
            if k != "loss/total"
        }
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
