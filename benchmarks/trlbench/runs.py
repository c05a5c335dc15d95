"""The per-framework side of `posttrain bench`: one GRPO run in posttrain or in TRL.

`run_posttrain` and `run_trl` train from the same model directory with the settings of a
`BenchConfig` (see `trlbench.bench` for what is held equal), recording each step's
wall time, completion tokens, mean reward and phase split in a `_Trace`; in accuracy mode
the trace also evaluates held-out accuracy with one code path for both (`HeldOutEval`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from posttrain.train.config.loader import load_config
from trlbench.report import reached

if TYPE_CHECKING:
    from trlbench.config import BenchConfig


def _train_examples(cfg: BenchConfig):
    from posttrain.data.tasks import get_task

    task = get_task(cfg.task, **cfg.task_options)
    return task, task.examples("train", cfg.n_train, seed=cfg.run.seed, difficulty=cfg.difficulty)


class HeldOutEval:
    """Greedy held-out accuracy with one evaluation code path for every framework.

    Calls posttrain's `evaluate_policy` (native engine, temperature 0) on `n_eval` test
    examples; the model is switched to eval mode for the call and restored afterwards.
    """

    def __init__(self, cfg: BenchConfig, tokenizer):
        from posttrain.data.tasks import get_task

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.task = get_task(cfg.task, **cfg.task_options)
        self.examples = self.task.examples(
            "test", cfg.accuracy.n_eval, seed=cfg.run.seed, difficulty=cfg.difficulty
        )

    def __call__(self, model: torch.nn.Module) -> float:
        from posttrain.train.evaluate import evaluate_policy

        was_training = model.training
        model.eval()
        try:
            out = evaluate_policy(
                model,
                self.tokenizer,
                self.examples,
                self.task,
                k=1,
                temperature=0.0,
                max_new_tokens=self.cfg.max_new_tokens,
                engine="native",
                seed=self.cfg.run.seed,
                enable_thinking=self.cfg.thinking,
            )
        finally:
            model.train(was_training)
        return float(out["accuracy"])


# --------------------------------------------------------------------------- one framework's run


class _Trace:
    """What one framework's run records, step by step (plain lists, JSON-ready)."""

    def __init__(
        self,
        framework: str,
        evaluator: HeldOutEval | None = None,
        target: float | None = None,
        eval_every: int = 0,
        max_steps: int = 0,
        max_seconds: float = float("inf"),
    ):
        self.framework = framework
        self.step_s: list[float] = []
        self.completion_tokens: list[int] = []
        self.reward_mean: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.lr: list[float] = []  # learning rate each step's update used (read before the step)
        self.evals: list[dict] = []  # {"step", "train_s", "accuracy"}
        self._evaluator, self._target = evaluator, target
        self._eval_every, self._max_steps, self._max_seconds = eval_every, max_steps, max_seconds

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases.setdefault(name, []).append(seconds)

    def end_step(self, seconds: float, model: torch.nn.Module | None = None) -> bool:
        """Record one step's wall time; in accuracy mode maybe evaluate. Returns True to stop."""
        self.step_s.append(seconds)
        if self._evaluator is None or model is None:
            return False
        step, train_s = len(self.step_s), sum(self.step_s)
        if step % self._eval_every == 0 or step >= self._max_steps or train_s >= self._max_seconds:
            acc = self._evaluator(model)
            self.evals.append({"step": step, "train_s": train_s, "accuracy": acc})
            if self._target is not None and reached(acc, self._target):
                return True
        return step >= self._max_steps or train_s >= self._max_seconds

    def to_dict(self) -> dict:
        return {
            "framework": self.framework,
            "step_s": self.step_s,
            "completion_tokens": self.completion_tokens,
            "reward_mean": self.reward_mean,
            "phases": self.phases,
            "lr": self.lr,
            "evals": self.evals,
        }


def use_posttrain_schedule(trainer, cfg: BenchConfig) -> None:
    """Make a transformers Trainer build posttrain's exact learning-rate schedule.

    transformers has no scheduler equal to `optim.lr_factor`: its "cosine_warmup_with_min_lr"
    shares our warmup ((step + 1) / warmup, so the first update already moves) but runs the
    cosine one step ahead, and its other warmups give the first update lr 0. So the trainer's
    `create_scheduler` is replaced by a LambdaLR over `lr_factor` with the horizon the
    Trainer passes (max_steps, the `steps` of posttrain's run): both frameworks then use
    the same learning rate on every step (recorded in each trace's "lr").
    """
    from posttrain.train.common.optim import lr_factor

    floor = cfg.min_lr_ratio if cfg.lr_schedule == "cosine" else 0.0

    def create_scheduler(num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else trainer.optimizer,
                lambda step: lr_factor(
                    step,
                    warmup_steps=cfg.warmup_steps,
                    total_steps=num_training_steps,
                    schedule=cfg.lr_schedule,
                    min_lr_ratio=floor,
                ),  # fmt: skip
            )
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def _trl_reward(fn, name: str, tokenizer, thinking: bool):
    """Adapt a posttrain reward to TRL's reward-function call.

    TRL passes the conversational prompt and completions ([{"role": ..., "content": ...}]);
    posttrain's rewards see the chat-templated prompt text and the completion text, as in
    our loop, so the very same function scores both frameworks.
    """
    from posttrain.engines.encoding import render_prompt

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        prompt_texts = [render_prompt(tokenizer, p, thinking) if isinstance(p, list) else p for p in prompts]
        return fn(prompt_texts, texts, answer=list(answer))

    reward.__name__ = name
    return reward


def build_trl_trainer(
    cfg: BenchConfig, model_dir: Path, out_dir: Path, *, gradient_checkpointing: bool, steps: int,
    seed: int | None = None,
):  # fmt: skip
    """TRL 1.16 GRPOTrainer with settings mirrored from `cfg` (see module docstring).

    TRL hyper-parameters set explicitly (defaults differ from ours or from the issue):
    bf16/fp16 off (fp32), use_cpu on a CPU device, posttrain's exact learning-rate
    schedule (`use_posttrain_schedule`; TRL's default linearly decays to 0 over max_steps),
    loss_type="dapo" (token-level mean over the whole batch), scale_rewards =
    `cfg.advantage_scale`, reward_weights [1, format_weight] summed before the advantage
    (TRL's default "sum_then_normalize", as our weighted reward sum), num_iterations=1
    (strictly on-policy), per_device_train_batch_size = prompts x G completions with
    gradient_accumulation_steps=1, seed = `seed` (default run.seed) for sampling and data order,
    use_bias_correction_kl = (cfg.kl_estimator == "k3_is"), TRL's default being True.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.rewards import build_reward
    from posttrain.engines.models import load_tokenizer

    _, examples = _train_examples(cfg)
    rows = [{"prompt": [{"role": "user", "content": ex.prompt}], "answer": ex.answer} for ex in examples]
    # posttrain's loader, so TRL tokenizes exactly as our loop does.
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    # The very reward functions posttrain's loop builds from `rl_config_dict`'s rewards.
    funcs = [_trl_reward(build_reward("task", task=cfg.task, **cfg.task_options), f"task_{cfg.task}",
                         tokenizer, cfg.thinking)]  # fmt: skip
    weights = [1.0]
    if cfg.format_weight > 0:
        funcs.append(_trl_reward(build_reward("format"), "format", tokenizer, cfg.thinking))
        weights.append(cfg.format_weight)
    batch = cfg.prompts_per_step * cfg.group_size
    # transformers 5.25 renamed TrainingArguments.gradient_checkpointing (deprecated until v6).
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    ckpt_key = (
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    )
    # fmt: off
    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        **{ckpt_key: gradient_checkpointing}, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=1.0, top_k=0, learning_rate=cfg.lr,
        weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, beta=cfg.beta, epsilon=cfg.clip_eps,
        loss_type="dapo", scale_rewards=cfg.advantage_scale, reward_weights=weights,
        use_bias_correction_kl=cfg.kl_estimator == "k3_is",
        multi_objective_aggregation="sum_then_normalize", num_iterations=1, max_steps=steps, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=cfg.run.seed if seed is None else seed,
        chat_template_kwargs={"enable_thinking": cfg.thinking}, dataloader_num_workers=0,
    )
    # fmt: on
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    use_posttrain_schedule(trainer, cfg)
    return trainer


def run_trl(
    cfg: BenchConfig,
    model_dir: Path,
    out_dir: Path,
    *,
    gradient_checkpointing: bool,
    trace: _Trace,
    steps: int,
    seed: int | None = None,
) -> None:
    """`build_trl_trainer`'s trainer, trained for `steps` steps with each step timed.

    Generate time is measured by wrapping `GRPOTrainer._generate_single_turn` and
    generate+reward+reference time by wrapping `_generate_and_score_completions`.
    """
    from transformers import TrainerCallback

    trainer = build_trl_trainer(
        cfg, model_dir, out_dir, gradient_checkpointing=gradient_checkpointing, steps=steps, seed=seed
    )

    def timed(name, fn, count_tokens=False):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            trace.add_phase(name, time.perf_counter() - t0)
            if count_tokens:
                trace.completion_tokens.append(sum(len(ids) for ids in out[0]))
            return out

        return wrapper

    trainer._generate_single_turn = timed("generate_s", trainer._generate_single_turn, count_tokens=True)
    trainer._generate_and_score_completions = timed(
        "generate_score_s", trainer._generate_and_score_completions
    )

    class _Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            # The scheduler stepped after the previous update, so this is this step's LR.
            trace.lr.append(float(trainer.optimizer.param_groups[0]["lr"]))
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if trace.end_step(time.perf_counter() - self.t0, trainer.model):
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                trace.reward_mean.append(float(logs["reward"]))

    trainer.add_callback(_Clock())
    trainer.train()


def rl_config_dict(
    cfg: BenchConfig, model_dir: Path, out_dir: Path, steps: int, seed: int | None = None
) -> dict:
    """posttrain's GRPO (as an RLConfig mapping) matching `run_trl` setting for setting.

    `steps` is also the horizon of the learning-rate schedule (TRL's max_steps); `seed`
    (default run.seed) seeds sampling and prompt order, as TRL's `seed`.
    """
    data: dict[str, Any] = {
        "task": cfg.task,
        "task_options": dict(cfg.task_options),
        "n_train": cfg.n_train,
        # TRL's prompt pool (`_train_examples`) is drawn with run.seed whatever the sampling seed.
        "seed": cfg.run.seed,
        "enable_thinking": cfg.thinking,
    }
    if cfg.difficulty is not None:
        data["difficulty"] = cfg.difficulty
    rewards = [{"name": "task", "weight": 1.0, "options": {"task": cfg.task, **cfg.task_options}}]
    if cfg.format_weight > 0:
        rewards.append({"name": "format", "weight": cfg.format_weight})
    # fmt: off
    return {
        "steps": steps,
        "model": {"path": str(model_dir), "dtype": "float32"},
        "optim": {"lr": cfg.lr, "schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps,
                  "min_lr_ratio": cfg.min_lr_ratio if cfg.lr_schedule == "cosine" else 0.0,
                  "weight_decay": 0.0, "max_grad_norm": cfg.max_grad_norm},
        "run": {"output_dir": str(out_dir), "seed": cfg.run.seed if seed is None else seed, "save_every": 0},
        "data": data,
        "rollout": {"engine": "native", "prompts_per_step": cfg.prompts_per_step, "group_size": cfg.group_size,
                    "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens},
        # TRL's GRPO advantage: (r - mean_g) / (unbiased std_g + 1e-4).
        "algo": {"method": "grpo", "advantage": "grpo", "policy_loss": "ppo", "clip_eps_low": cfg.clip_eps,
                 "advantage_options": {"scale": cfg.advantage_scale, "std_eps": 1e-4, "unbiased_std": True},
                 "clip_eps_high": cfg.clip_eps, "aggregation": "token-mean",
                 "kl_placement": "loss" if cfg.beta > 0 else "none", "kl_estimator": cfg.kl_estimator, "kl_coef": cfg.beta,
                 "update_epochs": 1, "num_minibatches": 1},
        "rewards": rewards,
        "sample_log_every": 0,
    }
    # fmt: on


# Our RL loop's per-phase timings (metric key -> phase name in the trace).
_PT_PHASES = {
    "time/generate_s": "generate_s",
    "time/reward_s": "reward_s",
    "time/score_s": "score_s",
    "time/update_s": "update_s",
}


def run_posttrain(
    cfg: BenchConfig, model_dir: Path, out_dir: Path, *, trace: _Trace, steps: int, seed: int | None = None
) -> None:
    """posttrain's GRPO through the public RLTrainer, one `.step()` per timed step."""
    from posttrain.train.rl.controller import RLConfig, RLTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "rl.yaml"
    path.write_text(yaml.safe_dump(rl_config_dict(cfg, model_dir, out_dir, steps, seed), sort_keys=False))
    rl_cfg = load_config(RLConfig, path, [])
    trainer = RLTrainer(rl_cfg)
    try:
        for _ in range(steps):
            trace.lr.append(float(trainer.policy.optimizer.param_groups[0]["lr"]))
            t0 = time.perf_counter()
            metrics = trainer.step()
            seconds = time.perf_counter() - t0
            for key, phase in _PT_PHASES.items():
                if key in metrics:
                    trace.add_phase(phase, float(metrics[key]))
            trace.completion_tokens.append(
                int(round(float(metrics["rollout/length_mean"]) * float(metrics["rollout/batch_size"])))
            )
            trace.reward_mean.append(float(metrics["reward/mean"]))
            if trace.end_step(seconds, trainer.policy.model):
                break
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- orchestration
