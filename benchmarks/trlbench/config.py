"""The configuration of the TRL comparison (`BenchConfig`), its validation and its --dry-run plan.

What each mode measures and what is held equal between frameworks: `trlbench.bench`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.train.config.checks import setting

FRAMEWORKS = ("posttrain", "trl", "trl_gc")


@dataclass
class BenchRunSection:
    """Where the benchmark writes and its seed. The runs it times keep no checkpoints and
    log to their own traces, so the training run keys (resume, save_every, trackers, ...)
    are not accepted here."""

    output_dir: str = setting("runs/bench", "Output directory (results.json, results.md, traces).")
    seed: int = setting(0, "Seed of the problems, the models' initialisation and sampling.")


@dataclass
class AccuracySection:
    """Time-to-accuracy mode: SFT warm start, then GRPO until a held-out accuracy is reached."""

    sft_steps: int = setting(
        300, "SFT optimizer steps for the shared warm start; 0 = the model is the start."
    )
    sft_lr: float = setting(3e-3, "SFT learning rate.")
    sft_batch_size: int = setting(32, "SFT examples per optimizer step.")
    sft_examples: int = setting(2000, "Task training examples for SFT.")
    n_eval: int = setting(100, "Held-out test examples for the greedy evaluation.")
    eval_every: int = setting(5, "Evaluate every N GRPO steps (clock paused).")
    target: float | None = setting(
        None, "Absolute held-out accuracy to reach; null = SFT accuracy + target_gain."
    )
    target_gain: float = setting(0.10, "Accuracy gain over the SFT start that defines the target.")
    max_steps: int = setting(200, "Give up after this many GRPO steps.")
    max_seconds: float = setting(600.0, "Give up after this much training time (seconds, eval excluded).")
    stop_at_target: bool = setting(
        True, "Stop a run at the first evaluation that reaches the target; false = run to the limits."
    )


@dataclass
class RolloutSection:
    """Rollout mode: generation throughput of our engines."""

    engines: list[str] = setting(lambda: ["native"], "Rollout engines to time (native | hf).", factory=True)
    batch: int = setting(64, "Sequences per generate call.")
    new_tokens: int = setting(64, "Maximum tokens generated per sequence.")
    repeats: int = setting(3, "Timed generate calls (after one warm-up call).")


@dataclass
class BenchConfig:
    """Benchmark posttrain's GRPO step (and TRL's, when the `bench` extra is installed)."""

    mode: Literal["step", "accuracy", "rollout"] = setting(
        "step", "step: time per GRPO step; accuracy: time to a held-out accuracy; rollout: tokens/s."
    )
    frameworks: list[str] = setting(
        lambda: ["posttrain"],
        "Any of posttrain, trl (TRL, gradient checkpointing off), trl_gc (TRL default, on).",
        factory=True,
    )
    presets: list[str] = setting(
        lambda: ["small"], "Model presets (tiny | small | base); small is issue #8's config.", factory=True
    )
    model_path: str | None = setting(None, "Benchmark this HF model directory instead of presets.")
    task: str = setting("arithmetic", "Synthetic task giving prompts and the verifier.")
    task_options: dict[str, Any] = setting(
        dict, "Options of the task, e.g. {operators: '+-', trace: columns} for arithmetic.", factory=True
    )
    difficulty: int | None = setting(None, "Task difficulty; null = the task's mix of levels.")
    n_train: int = setting(2000, "Training prompts drawn from the task.")
    prompts_per_step: int = setting(4, "Prompts per GRPO step.")
    group_size: int = setting(8, "Samples per prompt (G).")
    max_new_tokens: int = setting(32, "Maximum completion length.")
    temperature: float = setting(1.0, "Sampling temperature.")
    lr: float = setting(1e-5, "Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "cosine"] = setting(
        "constant", "LR shape after warmup over the run's steps (accuracy: accuracy.max_steps)."
    )
    warmup_steps: int = setting(0, "Linear LR warmup steps, the first update at lr / warmup_steps.")
    min_lr_ratio: float = setting(0.0, "Cosine: final LR as a fraction of lr (the demo uses 0.1).")
    format_weight: float = setting(
        0.0, "Weight of the R1 format reward added to the task reward (demo: 0.2)."
    )
    advantage_scale: Literal["group", "batch"] = setting(
        "group", "GRPO advantage denominator: group std (GRPO) or batch std (the demo's)."
    )
    rl_seeds: list[int] = setting(
        list, "GRPO sampling seeds, one round each from the same start; empty = [run.seed].", factory=True
    )
    beta: float = setting(0.04, "KL coefficient (the KL is a loss term, as in TRL's GRPO).")
    kl_estimator: Literal["k3_is", "k3"] = setting(
        "k3_is",
        "KL loss estimator. k3_is (TRL's default use_bias_correction_kl=True): k3 times the "
        "ratio pi/pi_old, which is 1 on-policy but adds k3 * grad log pi to the gradient "
        "(DeepSeek-V3.2's unbiased KL); k3: plain k3 (TRL use_bias_correction_kl=False).",
    )
    clip_eps: float = setting(0.2, "PPO clip range (both sides).")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    thinking: bool = setting(True, "Chat template thinking mode for prompts.")
    steps: int = setting(10, "GRPO steps per framework (step mode).")
    skip_steps: int = setting(2, "First steps excluded from medians (allocator / lazy-init warm-up).")
    repeats: int = setting(1, "Back-to-back rounds over all frameworks (medians pool the rounds).")
    threads: int = setting(2, "torch.set_num_threads for every framework.")
    isolate: bool = setting(True, "Run each framework in its own subprocess.")
    sft_init: bool = setting(
        False, "Step mode: start from the SFT warm start (accuracy.sft_*), not random init."
    )
    accuracy: AccuracySection = setting(AccuracySection, "Time-to-accuracy mode.", factory=True)
    rollout: RolloutSection = setting(RolloutSection, "Rollout mode.", factory=True)
    run: BenchRunSection = setting(BenchRunSection, "Output directory and seed.", factory=True)


def _validate(cfg: BenchConfig) -> None:
    for name in cfg.frameworks:
        if name not in FRAMEWORKS:
            import difflib

            close = difflib.get_close_matches(name, FRAMEWORKS, n=1)
            hint = f" did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"bench.frameworks: unknown framework {name!r};{hint} valid: {', '.join(FRAMEWORKS)}"
            )
    if not cfg.frameworks and cfg.mode != "rollout":
        raise ConfigError("bench.frameworks is empty: name at least one of " + ", ".join(FRAMEWORKS))
    if cfg.group_size < 2:
        raise ConfigError(f"bench.group_size must be >= 2 for GRPO, got {cfg.group_size}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"bench.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    horizon = cfg.accuracy.max_steps if cfg.mode == "accuracy" else cfg.steps
    if cfg.warmup_steps >= horizon and cfg.mode != "rollout":
        raise ConfigError(
            f"bench.warmup_steps ({cfg.warmup_steps}) must be below the run's steps ({horizon})"
        )
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"bench.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.format_weight < 0:
        raise ConfigError(f"bench.format_weight must be >= 0, got {cfg.format_weight}")
    if len(set(cfg.rl_seeds)) != len(cfg.rl_seeds):
        raise ConfigError(f"bench.rl_seeds has duplicates: {cfg.rl_seeds}")
    if cfg.steps <= cfg.skip_steps and cfg.mode == "step":
        raise ConfigError(f"bench.steps ({cfg.steps}) must exceed bench.skip_steps ({cfg.skip_steps})")
    if any(f.startswith("trl") for f in cfg.frameworks) and cfg.mode != "rollout":
        try:
            import trl  # noqa: F401
        except ImportError:
            raise ConfigError(
                "bench.frameworks names TRL but trl is not installed: pip install 'posttrain[bench]'"
            ) from None


def _seeds(cfg: BenchConfig) -> list[int]:
    return list(cfg.rl_seeds) or [cfg.run.seed]


def _schedule_text(cfg: BenchConfig) -> str:
    text = cfg.lr_schedule + (f" to {cfg.min_lr_ratio:g}x" if cfg.lr_schedule == "cosine" else "")
    return text + (f", warmup {cfg.warmup_steps}" if cfg.warmup_steps else "")


def plan(cfg: BenchConfig) -> str:
    """What `posttrain bench` will run (for --dry-run)."""
    _validate(cfg)
    models = [cfg.model_path] if cfg.model_path else cfg.presets
    lines = [f"bench mode={cfg.mode} models={models} frameworks={cfg.frameworks}"]
    if cfg.mode == "rollout":
        r = cfg.rollout
        lines.append(f"engines={r.engines} batch={r.batch} new_tokens={r.new_tokens} repeats={r.repeats}")
    else:
        lines.append(
            f"GRPO: {cfg.prompts_per_step} prompts x G={cfg.group_size}, <= {cfg.max_new_tokens} new tokens, "
            f"T={cfg.temperature}, lr={cfg.lr} ({_schedule_text(cfg)}), beta={cfg.beta}, "
            f"reward task{f' + {cfg.format_weight} format' if cfg.format_weight else ''}, "
            f"{cfg.advantage_scale}-std advantages, seeds {_seeds(cfg)}, {cfg.threads} threads"
        )
        if cfg.mode == "step":
            lines.append(f"{cfg.steps} steps ({cfg.skip_steps} warm-up) x {cfg.repeats} rounds per framework")
        else:
            a = cfg.accuracy
            lines.append(
                f"SFT {a.sft_steps} steps, then GRPO <= {a.max_steps} steps / {a.max_seconds}s, eval every "
                f"{a.eval_every} on {a.n_eval} held-out examples"
            )
    lines.append(f"output: {cfg.run.output_dir}")
    return "\n".join(lines)
