"""Data parallelism for the offline loop (train/offline/loop.py) on torch.distributed + FSDP2.

What changes with N processes, and why the result equals one process on the same global
batch (weights, metrics rows):

- Data: the item list of step s is a pure function of (seed, s) (`batch_indices`), so every
  rank builds the whole list, computes the step's GLOBAL normalisers from it
  (`method.step_counts`), and runs its micro-batches on its own contiguous share (rank r
  takes items [r·B/N, (r+1)·B/N)). Each micro-batch loss is already divided by the global
  counts; FSDP2 averages gradients over ranks, so each rank back-propagates N x its loss and
  the result is the summed gradient of the whole batch. train.batch_size must divide by N, which also
  gives every rank the same number of forward/backward passes (FSDP2's collectives pair up).
- Clipping: the gradient norm is the global one (FSDP2's DTensor grads; optim.guarded_step
  takes `full_tensor()` of the total norm), so every rank clips, skips or rolls back alike.
- Metrics: the loss and the metric sums of each rank are all-reduced before `summarize`,
  so metrics rows hold global means; only rank 0 writes them (and the progress bar).
- Evaluation runs identically on every rank over the whole held-out set, on a full copy of
  the weights gathered for it (the engines' fused generation paths read weights directly,
  so they need plain tensors) and freed after it; every rank computes the same numbers and
  rank 0 logs them. Nothing is divided across ranks: evaluation costs what it costs on one
  rank, plus one full copy of the weights per rank while it runs.
- Checkpoints are sharded: every rank writes its own shards of the model and of the AdamW
  state with torch.distributed.checkpoint, rank 0 the small files (train/common/
  sharded_checkpoint.py); nobody gathers full weights for a checkpoint. They resume at any
  world size: N processes read the shards their layout needs (DCP reshards), one process
  reads them into the plain model. A one-process checkpoint (HF files) resumes here too:
  its weights go into the plain model before sharding, its optimizer state is sharded on
  load. `final/` is consolidated by rank 0 from gathered weights, in Hugging Face format.

Only one model per method is sharded (all four offline methods train one model).

LoRA: the PEFT-wrapped model is sharded like a plain one (FSDP2 shards the frozen base
weights too); the optimizer holds only the adapters (requires_grad), so the adapters'
gradients and AdamW state are sharded and nothing is kept for the base. Checkpoints hold
the adapters alone, as one process's LoRA checkpoints do (the base comes from model.path);
`final/` is written by rank 0 through the method's own save_final, merged as in one process.
"""

from __future__ import annotations

import copy

import torch

from posttrain.engines import distributed as dist
from posttrain.errors import ConfigError
from posttrain.train.common.sharded_checkpoint import is_sharded


def check_world(cfg, world: int) -> None:
    """What `world` processes need from an offline config; ConfigErrors, checked by the CLI
    before any process starts or any model is built."""
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of the number of processes ({world}) "
            "so every rank gets an equal share of each step"
        )


def check_data_parallel(cfg, method, world: int) -> None:
    """check_world, and one trained model (all four offline methods have one)."""
    check_world(cfg, world)
    if len(method.models) != 1:
        raise ConfigError(
            f"posttrain {method.name} trains {len(method.models)} models; data parallel needs one"
        )


class _ShardedOptimizer:
    """A load_state_dict() for CheckpointManager.load: a one-process optimizer file into the
    sharded optimizer."""

    def __init__(self, dp: DataParallel, optimizer: torch.optim.Optimizer):
        self.dp, self.optimizer = dp, optimizer

    def load_state_dict(self, state: dict) -> None:
        dist.load_full_optimizer_state(self.dp.model, self.optimizer, self.dp.by_name(state))


class DataParallel:
    """The sharded model of `method` and what the loop does differently with it.

    latest: the checkpoint the run resumes from (or None). A one-process checkpoint's weights
    are loaded into the plain model on every rank before sharding; a sharded one is loaded
    after sharding, in `load_rest`.
    """

    def __init__(self, method, ckpt, latest):
        self.method, self.ckpt = method, ckpt
        self.world, self.rank = dist.world_size(), dist.rank()
        ((self.name, self.model),) = method.models.items()
        self.sharded_latest = latest is not None and is_sharded(latest)
        if latest is not None and not self.sharded_latest:
            ckpt.load(latest, models=method.models, restore_rng=False)
        # An unsharded twin without storage: filled with gathered weights when a full model is
        # needed (generation in evaluation, HF files on rank 0), freed afterwards.
        self.device = next(self.model.parameters()).device
        self.skeleton = copy.deepcopy(self.model).to("meta")
        dist.shard_model(self.model)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ step
    def run_step(self, items: list[dict], micro_batch_size: int) -> tuple[float, dict]:
        """This rank's share of the step (global counts), then loss and metric sums over ranks."""
        from posttrain.train.offline.loop import run_microbatches

        counts = self.method.step_counts(items)
        share = len(items) // self.world
        mine = items[self.rank * share : (self.rank + 1) * share]
        # FSDP2 averages gradients over ranks; the losses are already divided by global counts,
        # so the sum is wanted: backward of world · loss (gloo has no pre-multiplied sum).
        loss, sums = run_microbatches(
            self.method, mine, micro_batch_size, train=True, counts=counts, grad_scale=float(self.world)
        )
        keys = sorted(sums)
        total = dist.all_reduce_sums([loss, *(sums[k] for k in keys)])
        return total[0], dict(zip(keys, total[1:]))

    def full_copy(self, weights: dict, device) -> torch.nn.Module:
        """A plain model with `weights` (a full state dict) and the sharded model's buffers."""
        plain = copy.deepcopy(self.skeleton).to_empty(device=device)
        plain.load_state_dict(weights)
        with torch.no_grad():  # non-persistent buffers (rotary tables) are not in a state dict
            for name, buf in self.model.named_buffers():
                plain.get_buffer(name).copy_(buf)
        return plain

    def evaluate(self) -> dict[str, float]:
        """method.evaluate() on a full copy of the weights, on every rank alike (no collectives
        inside, so the engines' fused generation paths see plain tensors)."""
        plain = self.full_copy(dist.full_model_state(self.model, everywhere=True), self.device)
        self.method.models[self.name] = plain
        try:
            return self.method.evaluate()
        finally:
            self.method.models[self.name] = self.model

    # ------------------------------------------------------------------ state
    def by_name(self, state: dict) -> dict:
        """A one-process optimizer state_dict (parameters numbered) keyed by parameter name."""
        return {
            "state": {self.names[i]: v for i, v in state["state"].items()},
            "param_groups": [
                dict(g, params=[self.names[i] for i in g["params"]]) for g in state["param_groups"]
            ],
        }

    def load_rest(self, latest, optimizer, scheduler) -> dict:
        """Optimizer, scheduler and RNG state of checkpoint `latest` (and the weights, for a
        sharded one); returns its state.json."""
        if self.sharded_latest:
            return self.ckpt.load(
                latest, models={self.name: self.model}, optimizers={"main": optimizer},
                schedulers={"main": scheduler},
            )  # fmt: skip
        return self.ckpt.load(
            latest,
            models={},
            optimizers={"main": _ShardedOptimizer(self, optimizer)},
            schedulers={"main": scheduler},
        )

    def save_final(self, path) -> None:
        """final/ by rank 0 from the gathered weights, through the method's own save_final."""
        dist.set_phase("saving final/")
        weights = dist.full_model_state(self.model)
        if self.rank == 0:
            self.method.models[self.name] = self.full_copy(weights, "cpu")
            try:
                self.method.save_final(path)
            finally:
                self.method.models[self.name] = self.model
        dist.barrier()
