"""posttrain vs TRL, side by side on one machine (GitHub issue #8).

Modes:
  step      median GRPO step time, completion tokens/s and reward curves of posttrain,
            TRL with gradient checkpointing off ("trl") and TRL's default with it on
            ("trl_gc"), per model preset, all from the same saved initial weights.
  accuracy  training time until held-out arithmetic accuracy reaches a target, every
            framework starting from the same posttrain SFT checkpoint.
  probe     where posttrain's step spends its time, and what shared-prompt scoring
            (engines/logprobs.py, on by default) saves against the full [B, L] forward,
            per pass and over whole GRPO steps (see benchmarks/_common.py).

Every mode prints a Markdown block (machine, load average, the exact command, tables)
for docs/benchmarks.md and keeps results.json under --out.

  python benchmarks/vs_trl.py --mode step --presets tiny,small,base --steps 12
  python benchmarks/vs_trl.py --mode accuracy --presets small --set lr=1e-4
  python benchmarks/vs_trl.py --mode accuracy --presets tiny --threads 1 \
      --set lr_schedule=cosine --set warmup_steps=5 --set min_lr_ratio=0.1 \
      --set format_weight=0.2 --set advantage_scale=batch --set "rl_seeds=[0,1,2]" ...
      (the demo's GRPO recipe for both frameworks, three sampling seeds from one SFT
      start; the full command is in docs/benchmarks.md)
  python benchmarks/vs_trl.py --mode probe --presets small
  python benchmarks/vs_trl.py --combine runs/a/accuracy runs/b/accuracy
      (the seeds of several accuracy runs of one recipe, pooled: per-seed table, and
      posttrain against each framework paired by seed: mean difference, 95% t interval,
      sign-flip test)

Needs the `bench` extra (pip install 'posttrain[bench]') for TRL.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from posttrain.train.config.loader import load_config
from trlbench.bench import BenchConfig, format_markdown, machine_info, prepare_model, run_bench


def _header(args: argparse.Namespace, started: float) -> str:
    info = machine_info()
    return (
        f"Command: `python benchmarks/vs_trl.py {shlex.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, wall {time.time() - started:.0f} s, "
        f"load average (1 min) at the end {info['loadavg_1m']} on {info['cores']} cores)\n"
    )


def run_mode(args: argparse.Namespace) -> str:
    frameworks = args.frameworks or ("posttrain,trl,trl_gc" if args.mode == "step" else "posttrain,trl")
    overrides = [
        f"mode={args.mode}",
        f"frameworks=[{frameworks}]",
        f"presets=[{args.presets}]",
        f"steps={args.steps}",
        f"repeats={args.repeats}",
        f"threads={args.threads}",
        f"run.output_dir={Path(args.out) / args.mode}",
        *args.set,
    ]
    if args.mode == "accuracy":
        # Defaults for a learnable start: two-digit +/- (level 1 has only 124 distinct train
        # prompts, which SFT memorises, leaving GRPO no reward variance), a learning rate
        # at which a few-M-parameter model moves without diverging (3e-4 diverged), and
        # 200 greedy held-out problems per evaluation.
        overrides = [
            "difficulty=2", "lr=1e-4", "accuracy.sft_steps=400", "accuracy.sft_lr=1e-3", "accuracy.n_eval=200",
            "accuracy.eval_every=10", "accuracy.max_steps=300", "accuracy.max_seconds=300",
        ] + overrides  # fmt: skip
    cfg = load_config(BenchConfig, None, overrides)
    if args.mode != "accuracy" or args.sft == "run_sft":
        return format_markdown(run_bench(cfg))
    # Our own teacher-forced warm start, then every framework starts from it (sft_steps=0).
    import _common as probes

    parts = []
    for preset in cfg.presets:
        base = Path(cfg.run.output_dir) / preset
        init = prepare_model(preset, base, cfg.run.seed)
        a = cfg.accuracy
        start = probes.teacher_forced_warm_start(
            init, base / "sft", task_name=cfg.task, difficulty=cfg.difficulty, steps=a.sft_steps, lr=a.sft_lr,
            batch_size=a.sft_batch_size, n_examples=a.sft_examples, seed=cfg.run.seed,
        )  # fmt: skip
        sub = load_config(BenchConfig, None, overrides + [f"model_path={start}", "accuracy.sft_steps=0",
                                                          f"run.output_dir={base}"])  # fmt: skip
        md = format_markdown(run_bench(sub))
        parts.append(md.replace("**model**", f"**{preset}** (teacher-forced SFT start, {a.sft_steps} steps)"))
    return "\n".join(parts)


def _rl_factory(cfg, model_dir: Path, out: Path):
    """RLConfig builder for the step probe: the benchmark's GRPO, one run dir per variant."""
    import yaml

    from posttrain.train.rl.controller import RLConfig
    from trlbench.bench import rl_config_dict

    def build(name: str):
        run_dir = out / f"probe-{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "rl.yaml").write_text(yaml.safe_dump(rl_config_dict(cfg, model_dir, run_dir, cfg.steps)))
        return load_config(RLConfig, run_dir / "rl.yaml", [])

    return build


def run_probe(args: argparse.Namespace) -> str:
    """Phase split of posttrain's own step, then the shared-prompt, prefill and mask probes."""
    import _common as probes
    from posttrain.engines.models import load_model, load_tokenizer
    from posttrain.engines.rollout import make_engine

    torch.set_num_threads(args.threads)
    out = Path(args.out) / "probe"
    lines = []
    cfg = load_config(
        BenchConfig,
        None,
        ["frameworks=[posttrain]", f"presets=[{args.presets}]", f"steps={args.steps}", f"threads={args.threads}",
         f"run.output_dir={out}", *args.set],
    )  # fmt: skip
    results = run_bench(cfg)
    lines.append(format_markdown(results))
    models = [("model", Path(cfg.model_path))] if cfg.model_path else [(p, None) for p in cfg.presets]
    for preset, path in models:
        model_dir = path or prepare_model(preset, out / preset, cfg.run.seed)
        (out / preset).mkdir(parents=True, exist_ok=True)
        model = load_model(str(model_dir))
        tokenizer = load_tokenizer(str(model_dir))
        # Prompt lengths of real chat-templated arithmetic prompts (32-43 tokens).
        lens = [32, 43, 42, 36][: cfg.prompts_per_step] or [32]
        lens += [38] * (cfg.prompts_per_step - len(lens))
        pre = probes.probe_shared_prefix(model, lens, cfg.group_size, cfg.max_new_tokens)
        prompts = [list(range(10, 10 + n)) for n in lens]
        fill = probes.probe_prefill_share(make_engine("native", model, tokenizer), prompts, cfg.group_size,
                                          cfg.max_new_tokens)  # fmt: skip
        L = max(lens) + cfg.max_new_tokens
        mask = probes.probe_attention_mask(model, cfg.prompts_per_step * cfg.group_size, L)
        lines.append(
            f"\n**{preset}** probes ({cfg.prompts_per_step} prompts x G={cfg.group_size}, T={cfg.max_new_tokens}):\n"
        )
        step = probes.probe_step_shared_prefix(_rl_factory(cfg, model_dir, out / preset), cfg.steps)
        off, on = step["full_forward"], step["shared_prompt"]
        lines.append("| what | full [B, L] forward (s) | shared prompt (s) | saving |\n|---|---|---|---|")
        for name, a, b in (("scoring forward (no grad)", pre["score_full_s"], pre["score_shared_s"]),
                           ("learner forward+backward", pre["update_full_s"], pre["update_shared_s"]),
                           ("RL step: scoring phase (median)", off["median_score_s"], on["median_score_s"]),
                           ("RL step: update phase (median)", off["median_update_s"], on["median_update_s"]),
                           ("RL step: whole step (median)", off["median_step_s"], on["median_step_s"])):  # fmt: skip
            lines.append(f"| {name} | {a:.3f} | {b:.3f} | {1 - b / a:.0%} |")
        dloss = max(abs(x["loss"] - y["loss"]) for x, y in zip(off["rows"], on["rows"]))
        lines.append(
            f"\nRL steps: {cfg.steps} per variant, first excluded; max |Δ loss| between the variants "
            f"over the steps {dloss:.1e} (same seeds, same samples)"
        )
        lines.append(
            f"\nshared-prefix numerics: max |Δ log-prob| {pre['max_abs_logprob_diff']:.1e}, max relative "
            f"gradient difference {pre['max_rel_grad_diff']:.1e}"
        )
        lines.append(
            f"\ngenerate: prefill alone {fill['prefill_s']:.3f} s of {fill['generate_s']:.3f} s "
            f"({fill['prefill_frac']:.0%}) for {cfg.prompts_per_step * cfg.group_size} rows of which only "
            f"{cfg.prompts_per_step} prompts are distinct"
        )
        lines.append(
            f"\nHF forward [B={cfg.prompts_per_step * cfg.group_size}, L={L}] with an all-ones attention mask "
            f"{mask['with_mask_s']:.3f} s vs none {mask['without_mask_s']:.3f} s ({mask['overhead']:+.0%})"
        )
        (out / preset / "probes.json").write_text(
            json.dumps({"shared_prefix": pre, "step": step, "prefill": fill, "mask": mask})
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["step", "accuracy", "probe"], default="step")
    ap.add_argument("--presets", default="small", help="comma-separated presets (tiny,small,base)")
    ap.add_argument(
        "--frameworks", default=None, help="comma-separated; default all three (step) / posttrain,trl"
    )
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps per framework (step mode)")
    ap.add_argument("--repeats", type=int, default=1, help="back-to-back rounds over the frameworks")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for every framework")
    ap.add_argument("--sft", choices=["run_sft", "teacher_forced"], default="run_sft",
                    help="accuracy mode: warm start with posttrain's run_sft or the benchmark's teacher forcing")  # fmt: skip
    ap.add_argument("--out", default="runs/vs_trl", help="output directory")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any BenchConfig override, e.g. --set lr=1e-4 (repeatable)")  # fmt: skip
    ap.add_argument("--rebuild", action="store_true",
                    help="recompute --out's step/accuracy tables from the saved traces (no runs)")  # fmt: skip
    ap.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                    help="pool the seeds of finished accuracy runs (their --out/accuracy directories) of one "
                         "recipe and print the per-seed table and the paired comparison (no runs)")  # fmt: skip
    args = ap.parse_args(argv)
    started = time.time()
    if args.combine:
        from trlbench.bench import combine_results, format_combined

        print(format_combined(combine_results(args.combine)))
        return 0
    if args.rebuild:
        from trlbench.bench import rebuild_results

        print(format_markdown(rebuild_results(Path(args.out) / args.mode)))
        return 0
    body = run_probe(args) if args.mode == "probe" else run_mode(args)
    text = _header(args, started) + "\n" + body
    out = Path(args.out) / args.mode
    out.mkdir(parents=True, exist_ok=True)
    (out / "section.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    from posttrain.errors import PosttrainError

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        raise SystemExit(main())
    except PosttrainError as e:  # bad input: one line, no traceback
        raise SystemExit(f"vs_trl: {e}") from None
