"""Per-rank memory of parameters + optimizer state, and step time, at 1 and N processes.

The offline loop's data parallelism (train/offline/dp.py) shards parameters, gradients and
AdamW state with FSDP2 (engines/distributed.shard_model). This measures what one rank
holds after the first optimizer step:

- params_MiB: bytes of the rank's parameter storage (its DTensor shards under FSDP2),
- optim_MiB: bytes of its AdamW state (exp_avg, exp_avg_sq, step),
- rss_MiB: the process's peak resident set (everything: Python, torch, activations),

and the median wall time of an optimizer step on a fixed global batch (each rank takes
batch / N sequences, backward of N x its loss as the loop does). The global batch is the
same at every N, so the N-process step does the same total work split N ways, plus the
collectives.

Usage (one machine, CPU/gloo or GPU/nccl):

    python benchmarks/distributed.py --preset base --nproc 1 2 --steps 8 --batch 8 --seq 128

Each N runs as `python -m torch.distributed.run --standalone --nproc-per-node N` on this
script; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(args) -> None:
    from posttrain.engines import distributed as dist
    from posttrain.engines.models import load_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    dist.init_from_env()
    world, rank = dist.world_size(), dist.rank()
    torch.manual_seed(0)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = load_model(args.preset, dtype="float32", device=device, tokenizer=build_char_tokenizer())
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        dist.shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (args.batch, args.seq), generator=g)  # the global batch
    share = args.batch // world
    mine = ids[rank * share : (rank + 1) * share].to(device)
    times = []
    for step in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, share, args.micro):
            chunk = mine[start : start + args.micro]
            logits = model(input_ids=chunk).logits[:, :-1]  # [b, L-1, V]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            ) / (args.batch * (args.seq - 1))
            (loss * world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 0:
            params = _bytes(model.parameters())
            optim = _bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    row = {
        "rank": rank,
        "world": world,
        "n_params": n_params,
        "params_MiB": params / 2**20,
        "optim_MiB": optim / 2**20,
        "rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": sorted(times[1:])[len(times[1:]) // 2],
    }
    if torch.cuda.is_available():
        row["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    print("ROW " + json.dumps(row), flush=True)
    dist.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    passed = ["--preset", args.preset, "--steps", str(args.steps), "--batch", str(args.batch),
              "--micro", str(args.micro), "--seq", str(args.seq), "--worker"]  # fmt: skip
    print(
        "| processes | rank | params (MiB) | AdamW state (MiB) | params + state (MiB) | peak RSS (MiB) | step (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               __file__, *passed]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
        rows = sorted((json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")),
                      key=lambda r: r["rank"])  # fmt: skip
        for r in rows:
            both = r["params_MiB"] + r["optim_MiB"]
            print(f"| {n} | {r['rank']} | {r['params_MiB']:.2f} | {r['optim_MiB']:.2f} | {both:.2f} | "
                  f"{r['rss_MiB']:.0f} | {r['step_s']:.3f} |")  # fmt: skip
    print(f"\n{rows[0]['n_params'] / 1e6:.1f}M parameters (preset {args.preset}), global batch {args.batch} x "
          f"{args.seq} tokens, micro-batch {args.micro}; step = median of steps 2..{args.steps}")  # fmt: skip


if __name__ == "__main__":
    main()
