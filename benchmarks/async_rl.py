"""Synchronous vs asynchronous GRPO on the demo task: samples/s, time to a held-out target,
weight-sync time.

The demo's two stages (train/demo.py): one SFT warm start, shared by every run, then the
demo's GRPO stage once per `rollout.max_staleness` k (0 = synchronous; k >= 1: generation
runs ahead of training by at most k policy versions, train/rl/async_rollouts.py), each in
process (`--backend process`, the generator's own copy sampling in a background thread) and
optionally on a local Ray instance (`--backend ray`). Held-out greedy accuracy is measured
every `--eval-every` steps; the "time to target" is the training wall time (the sum of
`time/step_s`, evaluation excluded) until the first evaluation at or above the target
(`--target` points above the SFT start).

    python benchmarks/async_rl.py --staleness 0 1 2 --steps 300 --target 15
    python benchmarks/async_rl.py --staleness 0 1 --backend ray --steps 200

Prints a Markdown table: per (backend, k) the median step time over steps 3.., samples/s
(sampled sequences over the summed step time), the median weight-sync time, the mean
staleness of the trained tokens, the final held-out accuracy and the time to target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def summarise(rows: list[dict], before: float, target: float) -> dict:
    steps = [r for r in rows if "time/step_s" in r]
    timed = steps[2:] or steps
    elapsed, reached = 0.0, None
    by_step = {r["step"]: r for r in steps}
    for r in sorted(rows, key=lambda r: r["step"]):
        if "time/step_s" in r and r is by_step.get(r["step"]):
            elapsed += r["time/step_s"]
        acc = r.get("eval/accuracy")
        if reached is None and acc is not None and r["step"] > 0 and acc >= before + target:
            reached = elapsed
    total = sum(r["time/step_s"] for r in steps)
    samples = sum(r.get("rollout/batch_size", 0) for r in steps)
    evals = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
    return {
        "step_s": statistics.median(r["time/step_s"] for r in timed),
        "samples_per_s": samples / max(total, 1e-9),
        "sync_s": statistics.median(r.get("time/weight_sync_s", 0.0) for r in timed),
        "staleness": statistics.mean(r.get("async/staleness_mean", 0.0) for r in steps),
        "final_acc": evals[-1] if evals else float("nan"),
        "to_target_s": reached,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backend", nargs="+", default=["process"], choices=["process", "ray"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--target", type=float, default=15.0, help="held-out points above the SFT start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()

    from posttrain.train.demo import DemoConfig, _quiet_transformers, _stage_configs, write_sft_data
    from posttrain.train.offline.commands import run_sft
    from posttrain.train.rl.controller import run_rl

    _quiet_transformers()
    root = Path(args.dir or tempfile.mkdtemp(prefix="async_rl_"))
    cfg = DemoConfig()
    cfg.run.seed = args.seed
    cfg.run.output_dir = str(root)
    cfg.rl_steps = args.steps
    cfg.eval_every = args.eval_every
    sft, _ = _stage_configs(cfg, root)
    if not (root / "sft" / "final").exists():
        write_sft_data(cfg, root / "data")
        run_sft(sft)
    table = []
    for backend in args.backend:
        for k in args.staleness:
            _, rl = _stage_configs(cfg, root)
            rl.run.output_dir = str(root / f"rl_{backend}_k{k}")
            rl.run.save_every = 0
            rl.backend = backend
            rl.rollout.max_staleness = k
            t0 = time.perf_counter()
            out = run_rl(rl)
            wall = time.perf_counter() - t0
            before = 100 * out["eval_before"]["eval/accuracy"]
            rows = _rows(Path(rl.run.output_dir) / "metrics.jsonl")
            for r in rows:
                if r.get("eval/accuracy") is not None:
                    r["eval/accuracy"] *= 100
            s = summarise(rows, before, args.target)
            table.append((backend, k, before, wall, s))
            print(json.dumps({"backend": backend, "k": k, "before": before, "wall_s": wall, **s}), flush=True)
    print(f"\nGRPO demo stage, {args.steps} steps, seed {args.seed}, target +{args.target:g} points\n")
    print("| backend | k | step s (median) | samples/s | sync s | staleness | held-out before -> after | time to target |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, k, before, _wall, s in table:
        tt = f"{s['to_target_s']:.0f} s" if s["to_target_s"] is not None else "not reached"
        print(
            f"| {backend} | {k} | {s['step_s']:.3f} | {s['samples_per_s']:.1f} | {s['sync_s']:.4f} | "
            f"{s['staleness']:.2f} | {before:.1f}% -> {s['final_acc']:.1f}% | {tt} |"
        )


if __name__ == "__main__":
    main()
