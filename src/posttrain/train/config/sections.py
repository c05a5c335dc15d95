"""Config sections shared by the commands: the model to load or train, the optimizer, the
run directory and logging. Three model sections, each with only the keys its commands
read: `InferenceModelSection` (`posttrain eval`), `ValueModelSection` (+ gradient
checkpointing: reward models, PRMs) and `ModelSection` (+ LoRA: the policy trainers).

Each field documents itself in ``metadata["help"]`` (the source of ``--help``); each
section checks its values when it is built (`__post_init__`, see config_checks), so an
absurd value is a one-line ConfigError naming the key before any model is built.
Re-exported by `posttrain.train.config.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.errors import ConfigError
from posttrain.train.config.checks import check_attention, check_device, check_preset, setting, validate_optim

# --------------------------------------------------------------------------- shared sections


@dataclass
class InferenceModelSection:
    """Which model to load and how (`posttrain eval`: nothing is trained)."""

    path: str | None = setting(
        None, "Local path or hub id of a pretrained model; when set, `preset` is ignored."
    )
    preset: str = setting(
        "tiny", "Random-init preset architecture when `path` is unset (tiny | small | base)."
    )
    tokenizer: str | None = setting(
        None,
        "Tokenizer path or hub id; null = the model's own tokenizer, or the built-in "
        "character tokenizer for presets.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", "Parameter dtype of the trained model."
    )
    device: str = setting("cpu", "Torch device: cpu, cuda, cuda:1, ...")
    attn_implementation: str | None = setting(
        None, "Attention kernel passed to transformers (eager | sdpa | flash_attention_2)."
    )

    def __post_init__(self) -> None:
        if self.path is None:
            check_preset("model.preset", self.preset)
        check_device("model.device", self.device)
        check_attention("model.attn_implementation", self.attn_implementation)


@dataclass
class ValueModelSection(InferenceModelSection):
    """Which model to train and how to load it (reward models and PRMs: all weights, no LoRA)."""

    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")


@dataclass
class ModelSection(ValueModelSection):
    """Which model to train and how to load it, with optional LoRA adapters."""

    lora_r: int = setting(0, "LoRA rank; 0 trains all weights (no LoRA).")
    lora_alpha: int = setting(16, "LoRA scaling alpha (update scaled by alpha/r).")
    lora_target: list[str] = setting(
        lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Module names that receive LoRA adapters.",
        factory=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_r < 0 or self.lora_alpha <= 0:
            key, value = ("lora_r", self.lora_r) if self.lora_r < 0 else ("lora_alpha", self.lora_alpha)
            raise ConfigError(f"model.{key} must be {'>= 0' if key == 'lora_r' else '> 0'}, got {value}")


@dataclass
class OptimSection:
    """AdamW and its learning-rate schedule."""

    lr: float = setting(1e-5, "Peak learning rate (reached after warmup).")
    weight_decay: float = setting(0.0, "Decoupled AdamW weight decay.")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW (beta1, beta2).")
    eps: float = setting(1e-8, "AdamW denominator epsilon.")
    warmup_steps: int = setting(0, "Optimizer steps of linear warmup from ~0 to lr.")
    schedule: Literal["constant", "linear", "cosine"] = setting("constant", "LR shape after warmup.")
    min_lr_ratio: float = setting(0.0, "Final LR as a fraction of lr for the linear / cosine schedules.")
    max_grad_norm: float = setting(1.0, "Clip the global gradient norm to this; <= 0 disables clipping.")
    max_update_ratio: float = setting(
        1.0,
        "Roll back an update whose L2 norm exceeds this multiple of the trained weights' L2 "
        "norm, or that makes a weight non-finite, and count it as a bad step (run.max_bad_steps); "
        "0 disables the check and the copy of weights + optimizer state it keeps per update.",
    )

    def __post_init__(self) -> None:
        validate_optim(self)


@dataclass
class RunSection:
    """Where outputs go, seeding, checkpointing and logging."""

    output_dir: str = setting("runs/default", "Run directory (created).")
    seed: int = setting(0, "Seed for python, numpy and torch RNGs.")
    save_every: int = setting(0, "Checkpoint every N steps; 0 = only at the end.")
    keep_checkpoints: int = setting(2, "How many recent checkpoints to keep.")
    log_every: int = setting(1, "Write a metrics row every N steps.")
    resume: bool = setting(False, "Continue from the latest checkpoint in output_dir if one exists.")
    tensorboard: bool = setting(False, "Also log to TensorBoard (needs tensorboard).")
    wandb: bool = setting(False, "Also log to Weights & Biases (needs wandb).")
    wandb_project: str = setting("posttrain", "W&B project name.")
    max_bad_steps: int = setting(
        5,
        "Consecutive bad optimizer steps (non-finite loss or gradient: skipped; exploding "
        "update: rolled back) tolerated; the next one stops training. 0 stops at the first.",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.max_bad_steps, int) or self.max_bad_steps < 0:
            raise ConfigError(f"run.max_bad_steps must be an integer >= 0, got {self.max_bad_steps!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.save_every < 0 or self.log_every < 0:
            key = "save_every" if self.save_every < 0 else "log_every"
            raise ConfigError(f"run.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"run.seed must be in [0, 2**32), got {self.seed}")
