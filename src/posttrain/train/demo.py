"""`posttrain demo`: RL working on a laptop CPU in a few minutes, with no network.

The pipeline is the R1 recipe in miniature:
  1. SFT warm start of a random-init `tiny` model on reference solutions of two-digit
     addition/subtraction worked column by column (arithmetic task, difficulty 2,
     operators "+-", trace "columns"); it learns the <think>…</think><answer>…</answer>
     format and part of the arithmetic (~40% held-out greedy accuracy). Column traces make
     held-out problems reuse the single-digit facts and carry rule of training problems, so
     what RL reinforces can transfer (docs/benchmarks.md, "GRPO held-out arithmetic");
  2. GRPO with the math-verify accuracy reward and a 0.2-weight format reward, starting
     from the SFT model (group-mean baseline, batch-std scale, no KL, sampling at T=1,
     cosine learning rate), on train-split prompts most of which SFT never showed;
  3. greedy held-out evaluation (test split, never trained on) before and after RL
     (accuracy, format rate, mean length), PNG plots of the RL run and a Markdown/HTML
     report in the run directory.

Every stage is an ordinary `posttrain sft` / `posttrain rl` run in a subdirectory, so
the same results can be reproduced stage by stage from the saved `config.yaml` files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.train.config.checks import setting
from posttrain.train.config.loader import RunSection

# Test-split rows written next to the SFT training file: only the SFT eval loss reads them.
_SFT_EVAL_ROWS = 32


@dataclass
class DemoRun(RunSection):
    """Run directory of the demo; every other run setting (seed, checkpoints, resume, logging,
    trackers) applies to both stages."""

    output_dir: str = setting("runs/demo", "Run directory; stages go to sft/ and rl/ inside.")


@dataclass
class DemoConfig:
    """One-command CPU demo: SFT warm start -> GRPO (accuracy + format rewards) -> evaluation."""

    task: str = setting("arithmetic", "Synthetic task (arithmetic | countdown | sorting | word_problems).")
    task_options: dict[str, Any] = setting(
        lambda: {"operators": "+-", "trace": "columns"},
        "Options of get_task(task, ...); the default is two-digit +/- worked column by column "
        "(set --task_options '{}' for another task).",
        factory=True,
    )
    difficulty: int = setting(2, "Task difficulty level.")
    preset: str = setting("tiny", "Model preset trained from random init (tiny | small | base).")
    sft_steps: int = setting(
        250,
        "SFT warm-start optimizer steps (250 -> ~30-38% held-out greedy: enough correct samples per "
        "GRPO group for a signal, far from the ceiling for RL to show; 200 -> ~16% is too weak).",
    )
    sft_examples: int = setting(2000, "Reference solutions used for the warm start.")
    sft_batch_size: int = setting(32, "SFT examples per optimizer step.")
    sft_lr: float = setting(3e-3, "SFT learning rate.")
    rl_steps: int = setting(
        600,
        "GRPO steps. 600 (~8 CPU-minutes for the whole demo): +13 to +32 held-out points over the "
        'seeds measured; 300: +12 to +24 (docs/benchmarks.md, "Demo").',
    )
    rl_lr: float = setting(
        1e-4,
        "GRPO peak learning rate (after warmup, cosine down to a tenth). 1e-4 rose on every seed "
        "measured (+12 to +24 points); 2e-4 rose faster on some seeds but collapsed on one.",
    )
    rl_prompts: int = setting(
        8000,
        "Train-split prompts GRPO samples from (the first sft_examples of them are the SFT problems, "
        "the rest are new to the model, like the held-out ones).",
    )
    rl_warmup: int = setting(5, "GRPO learning-rate warmup steps.")
    kl_coef: float = setting(0.0, "KL-to-reference loss coefficient (0 = no reference model, faster).")
    advantage_scale: str = setting(
        "batch",
        "GRPO advantage denominator: group | batch | none. 'group' (the paper's z-score) makes a "
        "0.2-point format difference inside an all-wrong group as loud as a correct answer, and the "
        "tiny model then trades arithmetic for short well-formed replies; 'batch' keeps the group "
        "mean baseline but divides by the batch std, so reward weights keep their meaning.",
    )
    prompts_per_step: int = setting(12, "Prompts per GRPO step.")
    group_size: int = setting(8, "GRPO group size G (samples per prompt).")
    temperature: float = setting(
        1.0, "Rollout sampling temperature (the log-prob forward of the update uses the same)."
    )
    format_weight: float = setting(0.2, "Weight of the format reward next to accuracy (1.0).")
    step_weight: float = setting(
        0.0,
        "Weight of the step_credit reward (share of the reference trace's column steps reproduced "
        "before the first wrong one); 0 = off. Measured at 0.5: no gain over accuracy + format "
        "in held-out accuracy (docs/benchmarks.md).",
    )
    max_new_tokens: int = setting(40, "Response length budget.")
    eval_n: int = setting(128, "Held-out prompts evaluated (greedy) before and after RL.")
    eval_every: int = setting(20, "Held-out evaluation every N GRPO steps (for the accuracy plot); 0 = off.")
    run: DemoRun = setting(DemoRun, "Run directory and seed.", factory=True)

    def __post_init__(self) -> None:
        from posttrain.train.config.checks import check_preset

        check_preset("preset", self.preset)


def _stage_configs(cfg: DemoConfig, root: Path):
    from posttrain.train.config.loader import load_config
    from posttrain.train.config.rl import RewardSpec
    from posttrain.train.offline.commands import SFTConfig
    from posttrain.train.rl.controller import RLConfig

    sft = load_config(SFTConfig, None, [])
    sft.model.preset = cfg.preset
    # The SFT stage reads the task's reference solutions from files that run_demo writes
    # (train split -> sft_train.jsonl, test split -> sft_eval.jsonl), so task options reach it
    # the same way a user's own data would.
    sft.data.path = str(root / "data" / "sft_train.jsonl")
    sft.data.eval_path = str(root / "data" / "sft_eval.jsonl")
    sft.data.task = None
    sft.train.steps = cfg.sft_steps
    sft.train.batch_size = cfg.sft_batch_size
    sft.train.micro_batch_size = min(sft.train.micro_batch_size, cfg.sft_batch_size)
    sft.train.eval_every = 0
    sft.train.eval_at_start = False
    sft.train.eval_generations = 0
    sft.train.max_new_tokens = cfg.max_new_tokens
    sft.optim.lr = cfg.sft_lr
    sft.run.output_dir = str(root / "sft")

    rl = load_config(RLConfig, None, [])
    rl.steps = cfg.rl_steps
    rl.model.path = str(root / "sft" / "final")
    rl.data.task = cfg.task
    rl.data.task_options = dict(cfg.task_options)
    rl.data.difficulty = cfg.difficulty
    rl.data.n_test = cfg.eval_n
    rl.rollout.prompts_per_step = cfg.prompts_per_step
    rl.rollout.group_size = cfg.group_size
    rl.rollout.max_new_tokens = cfg.max_new_tokens
    rl.rollout.temperature = cfg.temperature
    rl.algo.method = "grpo"
    rl.algo.advantage_options = {"scale": cfg.advantage_scale}
    # kl_coef 0 drops the reference model and its scoring pass (none = nothing to compute).
    rl.algo.kl_coef = cfg.kl_coef
    if cfg.kl_coef == 0:
        rl.algo.kl_placement = "none"
    # R1-Zero's rule-based rewards: math-verify accuracy plus a smaller format reward.
    rl.rewards = [
        RewardSpec(name="accuracy", weight=1.0),
        RewardSpec(name="format", weight=cfg.format_weight),
    ]
    if cfg.step_weight:
        rl.rewards.append(RewardSpec(name="step_credit", weight=cfg.step_weight))
    rl.data.n_train = cfg.rl_prompts
    rl.optim.lr = cfg.rl_lr
    rl.optim.warmup_steps = cfg.rl_warmup
    # Annealing takes the noise of the last updates out of the final policy (measured: constant
    # 1e-4 +17 points in 100 steps, cosine from 2e-4 +21 in 150; docs/benchmarks.md).
    rl.optim.schedule = "cosine"
    rl.optim.min_lr_ratio = 0.1
    rl.eval.n = cfg.eval_n
    rl.eval.temperature = 0.0  # greedy before, during and after: one comparable number
    rl.eval.every = cfg.eval_every
    rl.eval.before_after = True
    rl.run.output_dir = str(root / "rl")
    # Every run setting but the directory applies to both stages (seed, checkpoints, resume,
    # logging, trackers).
    for stage in (sft, rl):
        for f in dataclasses.fields(RunSection):
            if f.name != "output_dir":
                setattr(stage.run, f.name, getattr(cfg.run, f.name))
    return sft, rl


def plan(cfg: DemoConfig) -> str:
    from posttrain.train.offline.commands import plan as sft_plan
    from posttrain.train.rl.controller import plan as rl_plan

    sft, rl = _stage_configs(cfg, Path(cfg.run.output_dir))
    return "posttrain demo\n\n[1/2] SFT warm start\n" + sft_plan(sft) + "\n\n[2/2] GRPO\n" + rl_plan(rl)


def _row(name: str, ev: dict[str, Any]) -> str:
    acc, fmt, length = (ev.get(f"eval/{k}", float("nan")) for k in ("accuracy", "format_rate", "length_mean"))
    return f"| {name:<16} | {100 * acc:7.1f}% | {100 * fmt:9.1f}% | {length:9.1f} |"


def results_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown before/after table of held-out accuracy, format rate and length."""
    return "\n".join(
        [
            "| model            | accuracy | format rate | mean length |",
            "|------------------|----------|-------------|-------------|",
            _row("SFT (before RL)", before),
            _row("GRPO (after RL)", after),
        ]
    )


def write_sft_data(cfg: DemoConfig, data_dir: Path) -> tuple[Path, Path]:
    """Write the warm-start data as prompt/completion JSONL: `cfg.sft_examples` reference
    solutions of the task's train split, and a small test-split file for the SFT loss.

    Returns (train path, eval path). The RL stage draws its prompts from the same train
    split and evaluates on the test split, which no stage ever trains on.
    """
    from posttrain.data.tasks import get_task, task_rows

    task = get_task(cfg.task, **cfg.task_options)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = (data_dir / "sft_train.jsonl", data_dir / "sft_eval.jsonl")
    for path, split, n in ((paths[0], "train", cfg.sft_examples), (paths[1], "test", _SFT_EVAL_ROWS)):
        rows = task_rows(task, split, n, seed=cfg.run.seed, kind="completion", difficulty=cfg.difficulty)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def _quiet_transformers() -> None:
    # Saving / loading the tiny checkpoints between stages prints "Writing model shards" /
    # "Loading weights" bars that drown the training progress of the demo.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (math-verify workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run SFT -> GRPO -> evaluation; print a before/after table; write plots and report."""
    from posttrain.train.common.checkpoint import atomic_write_text
    from posttrain.train.common.plots import plot_run
    from posttrain.train.common.report import write_report
    from posttrain.train.offline.commands import run_sft
    from posttrain.train.rl.controller import run_rl

    root = Path(cfg.run.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    sft_cfg, rl_cfg = _stage_configs(cfg, root)
    _quiet_transformers()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    write_sft_data(cfg, root / "data")

    print(
        f"[1/3] SFT warm start: {cfg.preset} model, {cfg.sft_steps} steps on {cfg.task} solutions", flush=True
    )
    run_sft(sft_cfg)  # each stage writes its own config.yaml once its inputs are checked
    t_sft = time.perf_counter() - t0

    print(
        f"[2/3] GRPO: {cfg.rl_steps} steps x {cfg.prompts_per_step} prompts x G={cfg.group_size}", flush=True
    )
    rl = run_rl(rl_cfg)
    t_rl = time.perf_counter() - t0 - t_sft

    print("[3/3] plots and report", flush=True)
    plots = plot_run([root / "rl"], root / "plots")
    report = write_report([root / "rl"], root / "report")
    t_total, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    table = results_table(rl.get("eval_before", {}), rl.get("eval_after", {}))
    summary = {
        "task": cfg.task,
        "task_options": dict(cfg.task_options),
        "difficulty": cfg.difficulty,
        "eval": f"greedy, {cfg.eval_n} held-out prompts (test split)",
        "eval_before": rl.get("eval_before", {}),
        "eval_after": rl.get("eval_after", {}),
        "wall_time_s": round(t_total, 1),
        "cpu_time_s": round(cpu, 1),
        "sft_time_s": round(t_sft, 1),
        "rl_time_s": round(t_rl, 1),
        "plots": [str(p) for p in plots],
        "report": str(report),
        "final_model": rl.get("final_model"),
    }
    atomic_write_text(root / "demo.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(root / "results.md", table + "\n")
    print()
    print(table)
    print(
        f"\nheld-out: greedy decoding on {cfg.eval_n} test-split prompts (never trained on)\n"
        f"wall time {t_total:.0f} s (SFT {t_sft:.0f} s, GRPO {t_rl:.0f} s), CPU time {cpu:.0f} s"
    )
    print(f"plots:  {root / 'plots'}\nreport: {report}\nmodel:  {rl.get('final_model')}")
    return summary
