"""Sharded checkpoints (train/common/sharded_checkpoint.py) when a rank dies while one is
written: the previous complete checkpoint stays the one `--resume` finds, and it loads.

Two ranks (gloo, CPU) run this file as a script: train a tiny FSDP2-sharded model one
step, save checkpoint 1, train another step, then save checkpoint 2 with one rank killing
itself (SIGKILL) at a chosen instant of the save — before writing its shards, right after
writing them, on rank 0 before the rename, or before `latest` is rewritten. The test then
finds the newest checkpoint in one process and checks its weights against the full weights
rank 0 recorded after step 1 (or step 2 when nothing is killed: the control case).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
TESTS, SRC = HERE.parents[1], HERE.parents[2] / "src"


def _build(shard: bool = False):
    from posttrain.engines import distributed as dist
    from tiny_models import small_family_model

    model = small_family_model("llama", 40).train()
    if shard:
        dist.shard_model(model)  # before the optimizer: FSDP2 replaces the parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill_at: str, rank: int, manager) -> None:
    """Make this rank kill itself at `kill_at` during the next save."""
    import torch.distributed.checkpoint as dcp

    save = dcp.save
    if kill_at == "rank1-before-shards" and rank == 1:
        dcp.save = lambda *a, **k: _die()
    elif kill_at == "rank1-after-shards" and rank == 1:
        dcp.save = lambda *a, **k: (save(*a, **k), _die())
    elif kill_at == "rank0-before-rename" and rank == 0:
        manager._rename_into_place = lambda *a: _die()
    elif kill_at == "rank0-before-latest" and rank == 0:
        manager._publish = lambda *a: _die()


def _worker(run_dir: Path, kill_at: str) -> None:
    from safetensors.torch import save_file

    from posttrain.engines import distributed as dist
    from posttrain.train.common.checkpoint import CheckpointManager

    dist.init_from_env()
    model, optimizer, scheduler = _build(shard=True)
    manager = CheckpointManager(run_dir, keep=2)
    ids = torch.arange(12).view(1, 12) + dist.rank()
    for step in (1, 2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        full = dist.full_model_state(model)
        if dist.rank() == 0:
            save_file(
                {k: v.contiguous() for k, v in full.items()}, str(run_dir / f"expected-{step}.safetensors")
            )
        if step == 2:
            _arm(kill_at, dist.rank(), manager)
        parts = dict(models={"policy": model}, optimizers={"main": optimizer}, schedulers={"main": scheduler})
        manager.save(step, **parts, state={"step": step})
    dist.shutdown()


KILLS = ["none", "rank1-before-shards", "rank1-after-shards", "rank0-before-rename", "rank0-before-latest"]


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL of one rank; gloo on Linux")
@pytest.mark.parametrize("kill_at", KILLS)
def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path, kill_at):
    from safetensors.torch import load_file

    from posttrain.train.common.checkpoint import CheckpointManager
    from posttrain.train.common.sharded_checkpoint import is_sharded

    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), POSTTRAIN_DIST_TIMEOUT_S="20")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), str(tmp_path), kill_at],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if kill_at == "none":
        assert codes == [0, 0]
    else:
        assert -signal.SIGKILL in codes and codes != [0, 0]

    manager = CheckpointManager(tmp_path, keep=2)
    latest = manager.latest()  # also clears what the killed save left behind
    want = 2 if kill_at == "none" else 1
    assert latest is not None and manager.step_of(latest) == want and is_sharded(latest)
    left = sorted(p.name for p in manager.dir.iterdir() if p.name.startswith("."))
    assert left == []
    if kill_at == "rank0-before-latest":  # complete, renamed, but not yet pointed at
        assert (manager.dir / "step-000002" / "meta.json").is_file()

    # Loads in one process, without a process group: weights, optimizer, scheduler, state.
    model, optimizer, scheduler = _build()
    state = manager.load(latest, models={"policy": model}, optimizers={"main": optimizer},
                         schedulers={"main": scheduler})  # fmt: skip
    assert state == {"step": want}
    expected = load_file(str(tmp_path / f"expected-{want}.safetensors"))
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert scheduler.get_last_lr() == [1e-2 * 0.5**want]
    steps = {float(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps == {float(want)}


def test_a_sharded_optimizer_loads_only_with_its_model(tmp_path):
    """Checked before any file is read: the optimizer's state is keyed by its model's names."""
    from posttrain.errors import TrainingError
    from posttrain.train.common.sharded_checkpoint import load_sharded

    meta = {"sharded": {"world_size": 2, "models": ["policy"], "optimizers": {"main": "policy"}}}
    _, optimizer, _ = _build()
    with pytest.raises(TrainingError, match="optimizer 'main' loads only with its model 'policy'"):
        load_sharded(tmp_path, meta, {}, {"main": optimizer})
    with pytest.raises(TrainingError, match="has no optimizer 'other'"):
        load_sharded(tmp_path, meta, {}, {"other": optimizer})


def _free_port() -> int:
    from posttrain.train.common.launch import free_port

    return free_port()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
    print(json.dumps({"rank": os.environ["RANK"], "done": True}))
