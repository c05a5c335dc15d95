"""The demo's two stages on a CUDA device: SFT warm start, then GRPO, in fp32 or bf16.

What a first GPU run checks end to end (model.device cuda: generation with the native
engine, the update, checkpoints, held-out evaluation) and what it costs: per stage the
wall time; per GRPO step the medians of `time/generate_s`, `time/update_s`,
`time/weight_sync_s` and `rollout/tokens_per_s`; the held-out greedy accuracy before and
after GRPO.

    python benchmarks/gpu_demo.py --dtype bfloat16 --rl-steps 100 --dir /tmp/gpu_demo

Prints one JSON line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--rl-steps", type=int, default=100)
    ap.add_argument("--dir", default="/tmp/gpu_demo")
    args = ap.parse_args()

    import torch

    from posttrain.train.demo import DemoConfig, _quiet_transformers, _stage_configs, write_sft_data
    from posttrain.train.offline.commands import run_sft
    from posttrain.train.rl.controller import run_rl

    _quiet_transformers()
    rows = []
    for dtype in args.dtype:
        root = Path(args.dir) / dtype
        cfg = DemoConfig()
        cfg.preset = args.preset
        cfg.run.output_dir = str(root)
        cfg.sft_steps, cfg.rl_steps, cfg.eval_every = args.sft_steps, args.rl_steps, 0
        write_sft_data(cfg, root / "data")
        sft, rl = _stage_configs(cfg, root)
        for stage in (sft, rl):
            stage.model.device, stage.model.dtype = args.device, dtype
        t0 = time.perf_counter()
        run_sft(sft)
        sft_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_rl(rl)
        rl_s = time.perf_counter() - t0
        steps = [json.loads(x) for x in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "time/step_s" in r][2:]

        def med(key: str, steps=steps) -> float:
            return statistics.median(r.get(key, 0.0) for r in steps)

        row = {
            "dtype": dtype, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "sft_s": sft_s, "rl_s": rl_s, "step_s": med("time/step_s"), "generate_s": med("time/generate_s"),
            "update_s": med("time/update_s"), "sync_s": med("time/weight_sync_s"),
            "tokens_per_s": med("rollout/tokens_per_s"),
            "before": out["eval_before"]["eval/accuracy"], "after": out["eval_after"]["eval/accuracy"],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| dtype | SFT s | GRPO s | step s | generate s | update s | sync s | rollout tokens/s | held-out before -> after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['sft_s']:.0f} | {r['rl_s']:.0f} | {r['step_s']:.3f} | {r['generate_s']:.3f} | "
            f"{r['update_s']:.3f} | {r['sync_s']:.4f} | {r['tokens_per_s']:.0f} | "
            f"{100 * r['before']:.1f}% -> {100 * r['after']:.1f}% |"
        )


if __name__ == "__main__":
    main()
