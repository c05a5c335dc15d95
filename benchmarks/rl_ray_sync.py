"""`posttrain rl --backend ray`: weight-sync time and bytes for 1 vs several buckets and
1 vs N rollout workers.

Each configuration is a fresh `python -m posttrain rl --backend ray` run (a local Ray
instance started and stopped by the run) of the same GRPO recipe; every run samples in
`max(workers)` seeded shards (`rollout.shards`), so all draw the same rollouts. Printed per
configuration, as Markdown: the medians over steps 3.. of `time/weight_sync_s` (the policy
learner's weights into the object store and every worker loading them), `time/generate_s`
(the slowest shard's generation) and `time/step_s`, and the per-sync `sync/bytes` (all
workers together) and `sync/buckets`.

    python benchmarks/rl_ray_sync.py --preset small --workers 1 2 --bucket-mb 0 1 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("time/weight_sync_s", "time/generate_s", "time/step_s")


def run(args, workers: int, bucket_mb: float, shards: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "posttrain", "rl", "--backend", "ray", "--model.preset", args.preset,
               "--data.task", "arithmetic", "--data.difficulty", "1", "--data.n_test", "0", "--algo.method", "grpo",
               "--steps", str(args.steps), "--rollout.prompts_per_step", str(args.prompts),
               "--rollout.group_size", str(args.group), "--rollout.max_new_tokens", str(args.tokens),
               "--rollout.shards", str(shards), "--ray.rollout_workers", str(workers),
               "--ray.sync_bucket_mb", str(bucket_mb), "--sample_log_every", "0", "--run.save_every", "0",
               "--run.output_dir", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"posttrain rl --backend ray failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/step_s" in r][2:]
    return {
        **{k: statistics.median(r[k] for r in timed) for k in KEYS},
        "sync/bytes": timed[-1]["sync/bytes"],
        "sync/buckets": timed[-1]["sync/buckets"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[0.0, 1.0])
    for flag, default in (("steps", 6), ("prompts", 4), ("group", 4), ("tokens", 16)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    args = ap.parse_args()
    shards = max(args.workers)
    print(
        "| rollout workers | bucket MB | buckets | bytes per sync | weight sync (s) | generate (s) | step (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers in sorted(args.workers):
        for bucket_mb in args.bucket_mb:
            res = run(args, workers, bucket_mb, shards)
            print(
                f"| {workers} | {bucket_mb:g}{' (one object)' if not bucket_mb else ''} | {res['sync/buckets']:.0f} "
                f"| {res['sync/bytes'] / 2**20:.1f} MiB | {res['time/weight_sync_s']:.3f} "
                f"| {res['time/generate_s']:.3f} | {res['time/step_s']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
