"""Checkpoint save under N processes: sharded (torch.distributed.checkpoint) vs gathered.

Under `--nproc N` posttrain writes sharded checkpoints (train/common/sharded_checkpoint.py):
every rank writes its own shards of the model and AdamW state. The alternative it
replaced gathers the full weights and optimizer state to rank 0, which writes the
one-process format (`CheckpointManager.save(..., sharded=False)`). This measures both on
the same FSDP2-sharded model after one optimizer step (so AdamW state exists):

- save_s: median wall time of a save, from the first rank entering it to the last leaving
  it (both end with a barrier), over `--saves` saves;
- MiB: bytes the checkpoint directory holds on disk;
- rank-0 / rank-1 peak RSS growth: how much each rank's peak resident set grew during the
  saves (each mode runs in fresh processes, so one mode's peak does not hide the other's).

    python benchmarks/checkpoint_save.py --preset base --nproc 2 --saves 3

Each mode runs as `python -m torch.distributed.run --standalone --nproc-per-node N` on this
script; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class _Holder:
    """state_dict() of the gathered optimizer state, for the one-process writer."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    from posttrain.engines import distributed as dist
    from posttrain.engines.models import load_model
    from posttrain.engines.tokenizer import build_char_tokenizer
    from posttrain.train.common.checkpoint import CheckpointManager

    dist.init_from_env()
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = load_model(args.preset, dtype="float32", device="cpu", tokenizer=tokenizer)
    skeleton = None
    if args.mode == "gathered":
        skeleton = copy.deepcopy(model).to("meta")
    dist.shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(10, 100, (2, 64), generator=torch.Generator().manual_seed(dist.rank()))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    manager = CheckpointManager(args.out, keep=1)
    before = _peak_mib()
    times = []
    for step in range(1, args.saves + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if args.mode == "sharded":
            manager.save(step, models={"policy": model}, tokenizer=tokenizer, optimizers={"main": optimizer},
                         state={"step": step})  # fmt: skip
        else:
            weights = dist.full_model_state(model)
            optim = dist.full_optimizer_state(model, optimizer)
            if dist.rank() == 0:
                plain = copy.deepcopy(skeleton).to_empty(device="cpu")
                plain.load_state_dict(weights)
                manager.save(step, models={"policy": plain}, tokenizer=tokenizer,
                             optimizers={"main": _Holder(optim)}, state={"step": step}, sharded=False)  # fmt: skip
                del plain
            del weights, optim
            dist.barrier()
        times.append(time.perf_counter() - t0)
    row = {"rank": dist.rank(), "times": times, "growth_MiB": _peak_mib() - before}
    row["n_params"] = sum(p.numel() for p in model.parameters())
    print("ROW " + json.dumps(row), flush=True)
    dist.shutdown()


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--mode", choices=["sharded", "gathered"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print("| format | save (s) | on disk (MiB) | files | " + " | ".join(
        f"rank {r} peak RSS growth (MiB)" for r in range(args.nproc)) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * args.nproc)
    for mode in ("gathered", "sharded"):
        with tempfile.TemporaryDirectory() as tmp:
            passed = [
                "--preset",
                args.preset,
                "--saves",
                str(args.saves),
                "--mode",
                mode,
                "--out",
                tmp,
                "--worker",
            ]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   __file__, *passed]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
            rows = sorted((json.loads(x[4:]) for x in out.splitlines() if x.startswith("ROW ")),
                          key=lambda r: r["rank"])  # fmt: skip
            ckpt = next((Path(tmp) / "checkpoints").glob("step-*"))
            files = sum(1 for f in ckpt.rglob("*") if f.is_file())
            # a save ends with a barrier on every rank: the slowest rank's time is the save's
            save_s = statistics.median(max(ts) for ts in zip(*(r["times"] for r in rows)))
            growth = " | ".join(f"{r['growth_MiB']:.0f}" for r in rows)
            print(f"| {mode} | {save_s:.3f} | {_size_mib(ckpt):.1f} | {files} | {growth} |", flush=True)
    print(f"\n{rows[0]['n_params'] / 1e6:.1f}M parameters (preset {args.preset}) on {args.nproc} processes, "
          f"AdamW; save = median of {args.saves}")  # fmt: skip


if __name__ == "__main__":
    main()
