"""`posttrain rl` on N processes (torch.distributed + FSDP2): what changes, and why N
processes reproduce one process on the same global batch.

- Rollouts (train/rl/shards.py): each round's prompt list is the same on every rank (a
  pure function of seed, step and round; PromptSource advances in lockstep because every
  rank feeds it the same gathered batch). Rank r generates and rewards its contiguous
  shards of that list (whole GRPO groups) from a plain full copy of the policy (the
  generator's model, refreshed from the gathered weights after each update), then the
  shards are all-gathered: every rank holds the step's whole batch, exactly what one
  process with `rollout.shards = N` samples. Dynamic-sampling refill decisions are then
  made on the global batch, identically everywhere.
- Scoring passes (old / reference / critic / teacher) run on the whole batch on every
  rank, so advantages, KL-in-reward, whitening, filters and the adaptive KL controller see
  the global batch with no further communication. This is N-fold redundant no-grad work
  (cheap next to generation and the update) bought for exactness and simplicity.
- Update (roles/updates.py): for each minibatch of the global permutation every rank
  takes its 1/N share of rows, divides the loss by the minibatch's GLOBAL token / sequence
  counts and back-propagates world · loss (FSDP2 averages gradients), so the summed
  gradient is the one-process gradient; the clip norm is the global one.
- Models: the policy and critic are sharded with FSDP2 (offline DataParallel: one unit per
  decoder layer + the other weight holders). The reference and the teacher are sharded the
  same way without optimizer state or gradients (roles/scorer.py `ScoringRole.shard`):
  their scoring passes are SPMD forwards on the same global batch on every rank; a
  reference refresh loads the policy's gathered weights into the reference's shards. Only
  the generator's sampling copy is a full plain copy on every rank (one extra full model
  per rank, documented in docs/distributed.md).
- Checkpoints are sharded: every rank writes its shards of the policy / critic and their
  AdamW state, and of a refreshed reference (torch.distributed.checkpoint;
  train/common/sharded_checkpoint.py), rank 0 the rest (schedulers, state). They resume at any
  world size, one process included; a one-process checkpoint resumes here through plain
  twins (`loading_parts`). `final/` and `final_critic/` are consolidated by rank 0 from
  gathered weights, in Hugging Face format.

Refused with one-line ConfigErrors before any model is built: prompts_per_step not a
multiple of N, rollout.shards not a multiple of N, the vLLM engine. TRPO's natural-gradient
step runs (train/rl/trpo.py: full vectors all-reduced over ranks).

LoRA: the PEFT-wrapped policy is sharded like a plain one (frozen base weights sharded too,
only the adapters in the optimizer, so their gradients and AdamW state are sharded); the
reference is that sharded policy with its adapters off, as in one process. Checkpoints hold
the adapters alone, as one process's do; `final/` is merged, as one process writes it.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from posttrain.engines import distributed as dist
from posttrain.errors import ConfigError


def check_world(cfg, world: int) -> None:
    """What `world` processes need from an RLConfig; ConfigErrors, checked by the CLI before
    any process starts or any model is built."""
    ro = cfg.rollout
    if ro.prompts_per_step % world:
        raise ConfigError(
            f"rollout.prompts_per_step={ro.prompts_per_step} must be a multiple of the number of processes "
            f"({world}) so every rank samples whole groups of an equal share of prompts"
        )
    if ro.shards and ro.shards % world:
        raise ConfigError(
            f"rollout.shards={ro.shards} must be 0 or a multiple of the number of processes ({world})"
        )
    if cfg.backend != "process":
        raise ConfigError(
            f"backend: {cfg.backend} places the roles itself; run it without --nproc / torchrun "
            "(ray.learners N makes the learners a data-parallel group of N actors)"
        )
    if ro.max_staleness:
        raise ConfigError(
            "rollout.max_staleness >= 1 (asynchronous RL) does not run under torch.distributed yet; "
            "use one process or backend: ray (with ray.learners for a data-parallel learner group)"
        )
    check_sharded_learners(cfg, "use one process", lora=True, trpo=True)


def check_sharded_learners(cfg, instead: str, *, lora: bool = False, trpo: bool = False) -> None:
    """What FSDP2-sharded RL learners refuse (here and in a Ray learner group,
    train/rl/ray_group.py); `instead` ends each message with what to do. `lora`: LoRA is
    supported (`--nproc` / torchrun); a Ray learner group, which hands its driver
    one-process checkpoint parts, still refuses it. `trpo`: TRPO is supported (`--nproc` /
    torchrun, tested 2 == 1 process); a Ray learner group, untested with it, refuses it."""
    if cfg.model.lora_r > 0 and not lora:
        raise ConfigError(f"LoRA (model.lora_r > 0) does not run under torch.distributed yet; {instead}")
    if cfg.rollout.engine == "vllm":
        raise ConfigError(f"rollout.engine=vllm does not run under torch.distributed yet; {instead}")
    if cfg.algo.trust_region is not None and not trpo:
        raise ConfigError(f"algo.trust_region (TRPO) does not run under torch.distributed yet; {instead}")


def shard(model: torch.nn.Module, name: str):
    """Shard `model` in place with FSDP2; returns the offline loop's DataParallel around it
    (a storage-less twin for full copies, name-keyed optimizer state, gathering)."""
    from posttrain.train.offline.dp import DataParallel

    return DataParallel(SimpleNamespace(models={name: model}), None, None)


def sampling_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain full copy of the (not yet sharded) policy for the generator: the engines'
    fused generation reads weights directly, and generation then needs no collectives."""
    return copy.deepcopy(model)


def gathered_parts(learner, name: str) -> tuple[dict, dict, dict] | None:
    """checkpoint_parts of a sharded learner in the ONE-PROCESS format, gathered to rank 0
    (None on other ranks); a collective. What a Ray learner group (train/rl/ray_group.py)
    hands its driver; `--nproc` runs write sharded checkpoints instead. The optimizer state is
    renumbered as a one-process optimizer numbers it."""
    weights = dist.full_model_state(learner.model)
    optim = dist.full_optimizer_state(learner.model, learner.optimizer)
    if dist.rank() != 0:
        return None
    index = {n: i for i, n in enumerate(learner.dp.names)}
    numbered = {
        "state": {index[n]: v for n, v in optim["state"].items()},
        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in optim["param_groups"]],
    }
    prefix = "" if name == "policy" else f"{name}_"
    return (
        {name: learner.dp.full_copy(weights, "cpu")},
        {f"{prefix}optimizer": SimpleNamespace(state_dict=lambda: numbered)},
        {f"{prefix}scheduler": learner.scheduler},
    )


def loading_parts(learner, name: str) -> tuple[dict, dict, dict, torch.nn.Module]:
    """checkpoint_parts for CheckpointManager.load of a ONE-PROCESS checkpoint into a sharded
    learner: the weights go to an empty plain twin (then `finish_load`), the optimizer state
    is sharded on load. (A sharded checkpoint loads into the learner's own parts.)"""
    from posttrain.train.offline.dp import _ShardedOptimizer

    plain = copy.deepcopy(learner.dp.skeleton).to_empty(device="cpu")
    prefix = "" if name == "policy" else f"{name}_"
    return (
        {name: plain},
        {f"{prefix}optimizer": _ShardedOptimizer(learner.dp, learner.optimizer)},
        {f"{prefix}scheduler": learner.scheduler},
        plain,
    )


def reference_twin(policy, reference) -> torch.nn.Module:
    """Where a ONE-PROCESS checkpoint's refreshed reference (HF files) loads: an empty plain
    twin of the policy's architecture when the reference is sharded (the caller then shards
    it in with `reference.refresh_from`), else the reference's own module."""
    if not reference.sharded:
        return reference.model
    return copy.deepcopy(policy.dp.skeleton).to_empty(device="cpu")


def finish_load(learner, plain: torch.nn.Module) -> None:
    """Shard the weights loaded into `plain` (every rank read the same files) into the learner.
    LoRA: a checkpoint holds the adapters alone (the frozen base came from model.path and is
    already in the learner), so only the trainable tensors are loaded."""
    state = plain.state_dict()
    if hasattr(plain, "peft_config"):
        trainable = set(learner.dp.names)
        state = {k: v for k, v in state.items() if k in trainable}
        dist.load_full_model_state(learner.model, state, strict=False)
        return
    dist.load_full_model_state(learner.model, state)


def full_module(learner) -> torch.nn.Module | None:
    """A plain CPU copy of a sharded learner's model on rank 0 (None elsewhere); a collective."""
    weights = dist.full_model_state(learner.model)
    return learner.dp.full_copy(weights, "cpu") if dist.rank() == 0 else None
