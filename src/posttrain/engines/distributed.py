"""torch.distributed helpers: process group from torchrun's environment, FSDP2 sharding,
reductions, and full (unsharded) state dicts gathered on rank 0.

One process is the default and never touches torch.distributed: every helper here is a
cheap no-op (`world_size() == 1`, `is_main()`) until `init_from_env()` found a torchrun
environment (WORLD_SIZE > 1). Nothing here logs or writes files; train/ decides who does.

Backend: gloo on CPU, nccl on CUDA (LOCAL_RANK picks the device). Every collective has a
timeout (`POSTTRAIN_DIST_TIMEOUT_S`, default 300 s), so a rank that hangs cannot block the
others forever; a rank that dies is normally noticed at once (gloo / nccl see the closed
connection) and the launcher stops the rest.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters, gradients and optimizer
state per decoder layer plus the root (embeddings, final norm, head). On CUDA a
MixedPrecisionPolicy computes in bf16 and reduces gradients in fp32 over fp32 master
weights; on CPU everything stays fp32.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "POSTTRAIN_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0

_phase = "startup"  # what this rank is doing, named in the message when a collective fails


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def env_rank() -> int:
    """This process's rank from the environment (usable before init): RANK, else 0."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """True on rank 0 and in a single process (whatever RANK says): the one writer of logs
    and files."""
    return not is_initialized() or dist.get_rank() == 0


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    return float(value) if value else DEFAULT_TIMEOUT_S


def init_from_env() -> bool:
    """Join the process group torchrun described (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); False, doing nothing, when WORLD_SIZE is 1 or unset."""
    if env_world_size() <= 1:
        return False
    if is_initialized():
        return True
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))
    return True


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def set_phase(phase: str) -> None:
    """Record what this rank is doing now (e.g. "step 12"), for `phase()` in error messages."""
    global _phase
    _phase = phase


def phase() -> str:
    return _phase


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sums(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a list of plain numbers (float64); identity in one process."""
    if world_size() == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (pickled); identity in one process."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled); [obj] in one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def load_full_model_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Load a full (unsharded) state dict, present on every rank, into a sharded model;
    strict=False loads a subset (a LoRA model's adapters) and keeps the other weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def _comm_device() -> torch.device:
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers model (any `*DecoderLayer` / `*Block` module)."""
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith(("DecoderLayer", "Block")) and any(True for _ in m.parameters())
    ]


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer, one per other module holding weights
    (embeddings, final norm, LM / score head; tied ones together), then the root; returns
    `model`.

    The non-layer modules get units of their own because the engines call the decoder and
    the head separately (engines/logprobs.py), never the root's forward: each unit all-gathers
    its weights on its own forward. Lazy initialisation is run from the root right away, as
    FSDP2 needs the root to initialise first.

    Gradients are AVERAGED over ranks (FSDP2's default; gloo has no pre-multiplied sum for a
    divide factor of 1), so a caller whose losses are divided by global counts scales its
    backward by the world size.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if torch.cuda.is_available():
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    inside = {id(m) for layer in layers for m in layer.modules()}
    rest = [
        m
        for m in model.modules()
        if m is not model and id(m) not in inside and any(True for _ in m.parameters(recurse=False))
    ]
    owners: dict[int, int] = {}
    tied = False
    for m in rest:
        for p in m.parameters(recurse=False):
            tied = tied or owners.get(id(p), id(m)) != id(m)
            owners[id(p)] = id(m)
    for group in [rest] if tied else [[m] for m in rest]:
        fully_shard(group if len(group) > 1 else group[0], **kwargs)
    fully_shard(model, **kwargs)
    model._get_fsdp_state()._lazy_init()
    return model


def full_model_state(model: torch.nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict: on CPU on rank 0 only ({} elsewhere), or with
    `everywhere` on every rank on the model's device. A collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (CPU, rank 0; {} elsewhere).

    A collective: call on every rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full, name-keyed optimizer state (present on every rank) into `optimizer`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def is_comm_error(exc: BaseException) -> bool:
    """True for the errors a failed or timed-out collective raises (a peer died or hung)."""
    names = {"DistBackendError", "DistNetworkError", "DistError", "DistStoreError"}
    if type(exc).__name__ in names:
        return True
    # gloo raises plain RuntimeErrors; match only its peer-lost and timeout messages, so a
    # genuine bug keeps its traceback.
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")
    )
