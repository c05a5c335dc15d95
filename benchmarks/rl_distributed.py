"""`posttrain rl` at 1 and N processes: step time split and peak memory per process.

The RL loop's data parallelism (train/rl/dp.py, docs/distributed.md) shards the policy and
critic with FSDP2 and gives every rank its own shards of the step's prompts to sample, plus
full frozen copies (the generator's sampling copy, the reference). This runs the same GRPO
recipe with `--nproc N` and, as the reference, in one process with `rollout.shards N` (the
same rollouts, so the same work), and prints per N the medians over steps 3.. of
`time/step_s`, `time/generate_s`, `time/update_s` and the largest peak RSS among the
processes (`ru_maxrss` of the launcher's children, or of the process itself at N = 1).

    python benchmarks/rl_distributed.py --preset small --nproc 1 2 --steps 8

Each N is a fresh `python -m posttrain rl` run in a temporary directory; the table is
printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("time/step_s", "time/generate_s", "time/update_s")
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def run(preset: str, nproc: int, shards: int, steps: int, prompts: int, group: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "posttrain", "rl", "--model.preset", preset, "--data.task", "arithmetic",
               "--data.difficulty", "1", "--data.n_test", "0", "--algo.method", "grpo", "--algo.kl_coef", "0.04",
               "--steps", str(steps), "--rollout.prompts_per_step", str(prompts), "--rollout.group_size", str(group),
               "--rollout.max_new_tokens", str(tokens), "--rollout.shards", str(shards), "--sample_log_every", "0",
               "--run.save_every", "0", "--run.output_dir", str(out)]  # fmt: skip
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        # A fresh wrapper per run, so its children's peak is this run's alone: ru_maxrss of
        # RUSAGE_CHILDREN is the largest single descendant's peak (KiB on Linux), i.e. the
        # one process at N = 1 and the largest rank at N > 1 (the launcher is small).
        wrapper = [sys.executable, "-c", _WRAPPER, *cmd]
        proc = subprocess.run(wrapper, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"posttrain rl --nproc {nproc} failed:\n{proc.stderr[-3000:]}")
        peak_kib = int(proc.stdout.strip().splitlines()[-1])
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/step_s" in r][2:]
    return {
        **{k: statistics.median(r[k] for r in timed) for k in KEYS},
        "peak_rss_MiB": peak_kib / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    n_max = max(args.nproc)
    print("| processes | step (s) | generate (s) | update (s) | peak RSS of one process (MiB) |")
    print("|---|---|---|---|---|")
    for n in sorted(args.nproc):
        # Every run samples in n_max seeded shards, so all runs draw the same rollouts.
        res = run(args.preset, n, n_max, args.steps, args.prompts, args.group, args.tokens)
        print(
            f"| {n} | {res['time/step_s']:.3f} | {res['time/generate_s']:.3f} | {res['time/update_s']:.3f} "
            f"| {res['peak_rss_MiB']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
