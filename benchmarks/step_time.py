"""Median time of each phase of a GRPO step, and whether any fast path was missed.

    python benchmarks/step_time.py                       # small preset, 4 prompts x 8, 32 tokens, beta 0.04
    python benchmarks/step_time.py --preset tiny --steps 20 --threads 2

Runs `posttrain rl` in this process on a random-init preset (no SFT start: the random
policy samples to the length limit, so every step has the same shape) and prints the
median over steps 3.. of every `time/*` metric, the `perf/fallback_*` totals and the
versions of torch and transformers. Compare stacks by running it from two virtualenvs
back to back on a quiet machine (docs/benchmarks.md, "Fresh install").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import transformers

from posttrain import cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kl-coef", type=float, default=0.04)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        status = cli.main(
            ["rl", "--model.preset", args.preset, "--data.task", "arithmetic", "--data.difficulty", "1",
             "--steps", str(args.steps), "--rollout.prompts_per_step", str(args.prompts),
             "--rollout.group_size", str(args.group), "--rollout.max_new_tokens", str(args.tokens),
             "--algo.method", "grpo", "--algo.kl_coef", str(args.kl_coef), "--run.output_dir", str(out)]
        )  # fmt: skip
        if status != 0:
            raise SystemExit(status)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:] or rows
    medians = {k: round(statistics.median(r[k] for r in timed), 3) for k in timed[0] if k.startswith("time/")}
    missed = {k: sum(r.get(k, 0) for r in rows) for k in rows[0] if k.startswith("perf/fallback_")}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)")
    print(
        f"{args.preset}: {args.prompts} prompts x {args.group}, {args.tokens} tokens, medians of steps 3-{args.steps}"
    )
    print(json.dumps({**medians, **missed}))


if __name__ == "__main__":
    main()
