"""Sharded checkpoints under torch.distributed (N > 1 processes): torch.distributed.checkpoint.

`CheckpointManager.save` (train/common/checkpoint.py) comes here when the process group has
more than one rank; one process never does (its format and cost are unchanged). Every rank
calls `save_sharded` with the same arguments (a collective). The checkpoint directory is the
one-process layout with the trained models and their optimizers replaced by one DCP
directory::

    step-000120/
      dcp/                  torch.distributed.checkpoint files: `.metadata` (rank 0) and one
                            `__<rank>_0.distcp` per rank holding that rank's shards of every
                            FSDP2-sharded model ("model/<name>") and of its optimizer state
                            ("optimizer/<name>", keyed by parameter name)
      <name>/               a model that is not sharded (the RL reference when refreshed), in
                            Hugging Face format, written by rank 0 as in one process
      tokenizer/            the tokenizer (rank 0)
      schedulers/<name>.pt  rank 0 (schedulers are identical on every rank)
      rng.json, rng.safetensors           rank 0's RNG states, as in one process
      rng-rank<r>.json, rng-rank<r>.safetensors   rank r's (r > 0)
      state.json, meta.json                rank 0; meta.json last, with "sharded": {world_size,
                            models, optimizers: optimizer name -> its model's name}

No rank ever holds the full weights or optimizer state for a checkpoint: each writes its own
shards. Atomicity is the one-process guarantee: rank 0 creates ``.tmp-step-N-<pid>`` and
broadcasts its path, every rank writes into it, a barrier, then rank 0 writes its small
files and meta.json and renames the directory into place (then ``latest``, then pruning),
so a kill at any instant — of any rank — leaves the previous complete checkpoint loadable.

Loading (`load_sharded`) works at any world size: under N processes each rank reads the
shards its FSDP2 layout needs (DCP reshards 2 -> 4 or 4 -> 2); in one process, without a
process group, DCP reads the full tensors into the plain model and optimizer
(`no_dist=True`). RNG: rank r restores rank r's states when the checkpoint has them, else
rank 0's (fewer ranks wrote it, or a one-process checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from posttrain.engines import distributed as dist
from posttrain.errors import TrainingError

DCP_DIR = "dcp"
TOKENIZER_DIR = "tokenizer"


def is_sharded(path: str | os.PathLike) -> bool:
    """True when the complete checkpoint at `path` was written by `save_sharded`."""
    try:
        return "sharded" in json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return False


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _owner(oname: str, optimizer, models: dict[str, torch.nn.Module]) -> str:
    """The name of the model whose parameters `optimizer` updates."""
    first = id(optimizer.param_groups[0]["params"][0])
    for mname, module in models.items():
        if any(id(p) == first for p in module.parameters()):
            return mname
    raise TrainingError(f"checkpoint: optimizer {oname!r} updates none of the models {sorted(models)}")


def rng_files(rank: int) -> tuple[str, str]:
    """(JSON, safetensors) file names of rank `rank`'s RNG states (rank 0: the one-process names)."""
    suffix = "" if rank == 0 else f"-rank{rank}"
    return f"rng{suffix}.json", f"rng{suffix}.safetensors"


def _model_state(module, **kw) -> dict:
    """The module's state for DCP; a LoRA (PEFT) model's adapters alone, as one process's
    LoRA checkpoints hold (its frozen base comes from model.path)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if _is_peft(module):
        kw["options"] = StateDictOptions(ignore_frozen_params=True)
    return get_model_state_dict(module, **kw)


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _optimizer_state(module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def save_sharded(
    manager, step: int, *, models: dict, tokenizer: Any, optimizers: dict, schedulers: dict, state_text: str
) -> Path:
    """Write checkpoint `step` from every rank (see the module docstring); returns its path."""
    import torch.distributed.checkpoint as dcp

    from posttrain.train.common.checkpoint import _fsync_file, _save_module, write_meta, write_rng

    sharded = sorted(n for n, m in models.items() if _is_fsdp(m))
    owners = {o: _owner(o, opt, models) for o, opt in optimizers.items()}
    rank = dist.rank()
    name = f"step-{step:06d}"
    tmp = None
    if rank == 0:
        manager.dir.mkdir(parents=True, exist_ok=True)
        manager.recover()
        tmp = manager.dir / f".tmp-{name}-{os.getpid()}"
        (tmp / DCP_DIR).mkdir(parents=True)
    tmp = Path(dist.broadcast_object(str(tmp) if tmp is not None else None))
    try:
        jname, tname = rng_files(rank)
        write_rng(tmp, jname, tname)
        for f in (tmp / jname, tmp / tname):
            _fsync_file(f)
        parts = {f"model/{n}": _model_state(models[n]) for n in sharded}
        parts.update(
            {f"optimizer/{o}": _optimizer_state(models[owners[o]], opt) for o, opt in optimizers.items()}
        )
        dcp.save(parts, checkpoint_id=tmp / DCP_DIR)  # each rank its shards, fsynced; rank 0 .metadata
        dist.barrier()  # every rank's files are complete
        final = manager.dir / name
        if rank == 0:
            written = {n: _save_module(m, tmp / n, tokenizer) for n, m in models.items() if n not in sharded}
            written.update({n: {"format": "dcp"} for n in sharded})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            (tmp / "schedulers").mkdir()
            for sname, obj in schedulers.items():
                torch.save(obj.state_dict(), tmp / "schedulers" / f"{sname}.pt")
            (tmp / "state.json").write_text(state_text)
            for f in tmp.rglob("*"):
                if f.is_file() and DCP_DIR not in f.relative_to(tmp).parts:
                    _fsync_file(f)
            write_meta(tmp, step, models, written, optimizers, schedulers, sharded={
                "world_size": dist.world_size(), "models": sharded, "optimizers": owners})  # fmt: skip
            manager._rename_into_place(tmp, final)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        manager._publish(final)
    dist.barrier()
    return final


def load_sharded(path: Path, meta: dict, models: dict, optimizers: dict) -> None:
    """Load the DCP-stored models and optimizers of `path` that were asked for, in place, at
    this world size (sharded FSDP2 modules, or plain ones in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    info = meta["sharded"]
    parts: dict[str, dict] = {}
    for mname in (n for n in models if n in info["models"]):
        parts[f"model/{mname}"] = _model_state(models[mname])
    for oname, opt in optimizers.items():
        owner = info["optimizers"].get(oname)
        if owner is None:
            raise TrainingError(f"checkpoint {path} has no optimizer {oname!r}")
        if owner not in models:
            raise TrainingError(f"checkpoint {path}: optimizer {oname!r} loads only with its model {owner!r}")
        parts[f"optimizer/{oname}"] = _optimizer_state(models[owner], opt)
    if not parts:
        return
    with warnings.catch_warnings():  # DCP warns that a no-process-group load is one process: asked for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(parts, checkpoint_id=path / DCP_DIR, no_dist=dist.world_size() == 1)
    for key, state in parts.items():
        kind, name = key.split("/", 1)
        if kind == "model":
            peft = _is_peft(models[name])  # adapters alone: the frozen base stays as built
            set_model_state_dict(models[name], state, options=StateDictOptions(strict=not peft))
        else:
            set_optimizer_state_dict(models[info["optimizers"][name]], optimizers[name], state)


def load_rng(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """This rank's RNG states from checkpoint `path` (rank 0's when it has none of its own)."""
    jname, tname = rng_files(dist.rank())
    if not (path / jname).is_file():
        jname, tname = rng_files(0)
    return json.loads((path / jname).read_text()), load_file(str(path / tname))
