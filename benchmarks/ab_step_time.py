"""Did a change cost speed? GRPO step time of two commits, measured in one interleaved run.

    python benchmarks/ab_step_time.py --before c4601e5                 # vs the working tree
    python benchmarks/ab_step_time.py --before main~3 --after main --rounds 5

Checks out each ref into a temporary git worktree (the working tree itself for `--after .`),
then alternates `benchmarks/step_time.py` runs between them (A B A B ...), each in a fresh
process on the same virtualenv, so that load on the machine hits both sides alike. Prints
every run's median `time/step_s` and the median over rounds per side, and the ratio
after / before. Same arguments as step_time.py after `--`.
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

ROOT = Path(__file__).resolve().parents[1]


def _tree(ref: str, tmp: Path) -> Path:
    if ref == ".":
        return ROOT
    path = tmp / ref.replace("/", "_").replace("~", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path), ref], check=True)
    return path


def _run(tree: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    # Always this checkout's step_time.py, so both sides run the same measurement.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), *extra],
        env=env, check=True, capture_output=True, text=True, cwd=tree,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git ref of the baseline")
    ap.add_argument("--after", default=".", help="git ref of the change ('.' = the working tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="arguments for step_time.py (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": _tree(args.before, Path(tmp)), "after": _tree(args.after, Path(tmp))}
        try:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for side in ("before", "after"):
                    res = _run(trees[side], args.extra)
                    runs[side].append(res)
                    print(
                        f"round {r + 1} {side:6s} step {res['time/step_s']:.3f} s  {json.dumps(res)}",
                        flush=True,
                    )
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
                    )
    med = {side: statistics.median(x["time/step_s"] for x in rs) for side, rs in runs.items()}
    print(
        f"median time/step_s: before ({args.before}) {med['before']:.3f} s, after ({args.after}) "
        f"{med['after']:.3f} s, ratio {med['after'] / med['before']:.3f}"
    )


if __name__ == "__main__":
    main()
