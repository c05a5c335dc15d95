"""Configs of the offline trainers (`posttrain sft | rm | prm | dpo`): one dataclass per
command, built from shared sections. Each command accepts only the keys it reads: the
SFT-only data keys live in `SFTDataSection`, the generation settings of the policy
trainers in `GenerativeTrainSection`, and reward models / PRMs take a `ValueModelSection`
(no LoRA). Re-exported by train/offline/commands.py, where the entry points are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.data.tasks.base import STEP_SEPARATOR
from posttrain.train.config.checks import check_range, check_sampling
from posttrain.train.config.loader import ModelSection, OptimSection, RunSection, ValueModelSection

# --------------------------------------------------------------------------- config sections


@dataclass
class OfflineDataSection:
    """Training data: a dataset file or a synthetic task, and its held-out split."""

    path: str | None = field(
        default=None,
        metadata={"help": "Dataset file/dir (JSONL, Parquet, CSV, HF save_to_disk); overrides task."},
    )
    eval_path: str | None = field(
        default=None, metadata={"help": "Held-out dataset; null = hold out eval_fraction of `path`."}
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of `path` rows held out when eval_path is null."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt in `path`."})
    keep_if: str | None = field(
        default=None,
        metadata={
            "help": "Keep only `path` / `eval_path` rows whose boolean column of this name is true, e.g. "
            "'correct' on a `posttrain eval` samples.jsonl (rejection-sampling SFT); null = keep all."
        },
    )
    task: str | None = field(
        default="arithmetic",
        metadata={
            "help": "Synthetic task (arithmetic | countdown | sorting | word_problems) when path is "
            "null; with a path, only used for held-out task accuracy."
        },
    )
    task_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Keyword options of get_task(task, ...), e.g. {operators: '+-', trace: columns} for arithmetic."
        },
    )
    difficulty: int | None = field(
        default=1, metadata={"help": "Task difficulty level; null = mix of all levels."}
    )
    n_train: int = field(default=2000, metadata={"help": "Synthetic training examples."})
    n_eval: int = field(default=128, metadata={"help": "Synthetic held-out examples (test split)."})
    seed: int = field(
        default=0, metadata={"help": "Seed of task generation, file hold-out and no-think choice."}
    )
    max_prompt_tokens: int = field(
        default=512, metadata={"help": "Prompt length limit in tokens after the chat template (0 = none)."}
    )
    too_long: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "What to do with a prompt over max_prompt_tokens (never truncated)."},
    )

    def __post_init__(self) -> None:
        check_range("data.max_prompt_tokens", self.max_prompt_tokens, 0)


@dataclass
class SFTDataSection(OfflineDataSection):
    """SFT data: the common data settings plus what only SFT reads (conversations, packing,
    thinking-mode fusion). `posttrain rm` / `prm` / `dpo` do not accept these keys."""

    messages: bool = field(
        default=False, metadata={"help": "`path` rows are conversations in a `messages` column."}
    )
    max_length: int = field(default=1024, metadata={"help": "Packing (algo.packing): tokens per packed row."})
    no_think_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Thinking-mode fusion: share of rows trained in no-think mode (empty <think></think>, "
            "reasoning stripped from the completion)."
        },
    )
    keep_shortest: bool = field(
        default=False,
        metadata={
            "help": "Keep each prompt's shortest row of `path` (after keep_if; length = the `length` column "
            "posttrain eval writes, else characters): with keep_if=correct, Kimi's shortest rejection sampling."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("data.no_think_fraction", self.no_think_fraction, 0, 1)


@dataclass
class PreferenceDataSection(OfflineDataSection):
    """Preference data: a file, the task's synthetic pairs, or pairs sampled from the policy."""

    format: Literal["pairs", "ranked"] = field(
        default="pairs",
        metadata={
            "help": "pairs: prompt/chosen/rejected rows; ranked: prompt/completions/scores (or ranks, 1 = best) "
            "rows of K candidates, trained on every pair they induce (N-best; see algo.pair_weighting)."
        },
    )

    pairs: Literal["synthetic", "self", "long_short"] = field(
        default="synthetic",
        metadata={
            "help": "Where pairs come from without a file: 'synthetic' (task solution vs. its made-up wrong "
            "solution) or 'self' (k samples per prompt from the initial policy, scored by the task verifier, "
            "paired correct vs. incorrect: on-policy / RS-DPO pairs); 'long_short' builds pairs from a "
            "`path` of sampled completions (posttrain eval samples.jsonl): shortest correct vs. longer."
        },
    )
    long_ratio: float = field(
        default=1.5,
        metadata={
            "help": "pairs=long_short: a CORRECT sample is a rejected (too long) one when it is at least this "
            "many times as long as the shortest correct one (wrong samples: whenever longer)."
        },
    )
    samples_per_prompt: int = field(
        default=8, metadata={"help": "pairs=self: samples drawn per prompt (train and held-out prompts)."}
    )
    pairs_per_prompt: int = field(
        default=1,
        metadata={"help": "pairs=self / long_short: most pairs kept per prompt, distinct texts."},
    )
    sample_temperature: float = field(
        default=1.0, metadata={"help": "pairs=self: sampling temperature (> 0)."}
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "pairs=self: generation cap (see keep_truncated)."}
    )
    keep_truncated: bool = field(
        default=False,
        metadata={
            "help": "pairs=self: keep samples cut by sample_max_new_tokens (scored like the rest, EOS appended); "
            "false drops them."
        },
    )


@dataclass
class OfflineTrainSection:
    """Steps, batch sizes and held-out evaluation."""

    steps: int = field(default=300, metadata={"help": "Optimizer steps; 0 = derive from epochs."})
    epochs: float = field(default=0.0, metadata={"help": "Passes over the training rows when steps is 0."})
    batch_size: int = field(default=32, metadata={"help": "Examples (pairs, traces) per optimizer step."})
    micro_batch_size: int = field(
        default=16, metadata={"help": "Examples per forward/backward; gradients accumulate to batch_size."}
    )
    eval_every: int = field(
        default=100, metadata={"help": "Held-out evaluation every N steps (and at the end); 0 = never."}
    )
    eval_at_start: bool = field(
        default=True, metadata={"help": "Also evaluate before the first step (logged at step 0)."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Examples per forward during evaluation."})


@dataclass
class GenerativeTrainSection(OfflineTrainSection):
    """Steps, batches and held-out evaluation of a policy (SFT, DPO): also task accuracy from
    generations, which reward models and PRMs do not make (their configs reject these keys)."""

    eval_generations: int = field(
        default=64,
        metadata={"help": "Held-out task prompts generated greedily for accuracy; 0 = skip."},
    )
    max_new_tokens: int = field(
        default=48, metadata={"help": "Generation length cap for the accuracy evaluation."}
    )
    eval_temperature: float = field(
        default=0.0,
        metadata={
            "help": "Also report eval/accuracy_sampled: mean accuracy of samples at this temperature (0 = off)."
        },
    )
    eval_samples: int = field(
        default=4, metadata={"help": "Samples per held-out prompt for eval/accuracy_sampled."}
    )

    def __post_init__(self) -> None:
        check_sampling(
            "train", temperature=self.eval_temperature, max_new_tokens=self.max_new_tokens, greedy_ok=True
        )


@dataclass
class SFTAlgoSection:
    """Supervised fine-tuning options."""

    packing: bool = field(
        default=False, metadata={"help": "Pack several examples per row (block-diagonal attention)."}
    )
    aggregation: str = field(
        default="token-mean",
        metadata={
            "help": "Loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."
        },
    )


@dataclass
class _ScalarHeadAlgoSection:
    """What the reward-model and PRM options share: the init of the new scalar head."""

    head_init_std: float | None = field(
        default=None, metadata={"help": "Std of the scalar head init; null = 1/sqrt(hidden+1)."}
    )

    def __post_init__(self) -> None:
        check_range("algo.head_init_std", self.head_init_std, 0)


@dataclass
class RMAlgoSection(_ScalarHeadAlgoSection):
    """Reward-model options."""

    loss: Literal["bradley_terry", "pointwise"] = field(
        default="bradley_terry",
        metadata={
            "help": "bradley_terry: −log σ(r_w − r_l − m) on prompt/chosen/rejected pairs; pointwise: "
            "(r − (s − b))² on prompt/completion/score rows (study guide §2.2)."
        },
    )
    score_column: str = field(
        default="score", metadata={"help": "pointwise: the column of `data.path` holding each row's score."}
    )
    baseline: Literal["none", "prompt_mean"] = field(
        default="none",
        metadata={
            "help": "pointwise: subtract each prompt's mean score from its rows' targets (prompt_mean), "
            "so the head learns how a completion compares with the prompt's others; none = raw scores."
        },
    )
    margin_column: str | None = field(
        default=None,
        metadata={"help": "Column with a per-pair margin m in −log σ(r_w − r_l − m); null = no margin."},
    )


@dataclass
class PRMAlgoSection(_ScalarHeadAlgoSection):
    """Process-reward-model options."""

    step_separator: str = field(
        default=STEP_SEPARATOR, metadata={"help": "Text appended after every step; its last token is scored."}
    )
    threshold: float = field(
        default=0.5, metadata={"help": "A step counts as wrong when PRM(≤t) is below this."}
    )
    until_first_error: bool = field(
        default=False,
        metadata={
            "help": "Train (and compute eval/prm/bce) on each trace's steps up to its first wrong step only, "
            "as PRM800K labels them; the first-wrong-step metrics still read whole held-out traces."
        },
    )


@dataclass
class PreferenceAlgoSection:
    """Preference-loss options."""

    loss: str = field(
        default="dpo", metadata={"help": "Preference loss: dpo | ipo | simpo | ln_dpo | hinge."}
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "Inverse temperature β; null = the loss's default (0.1 dpo, 2.0 simpo, ...)."},
    )
    nll_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a length-normalised NLL term on chosen completions (DPO+NLL, Pang et al. 2024); 0 = off."
        },
    )
    options: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Extra loss options, e.g. {label_smoothing: 0.1} for dpo or {gamma: 0.5} for simpo."
        },
    )
    pair_weighting: Literal["none", "gap"] = field(
        default="none",
        metadata={
            "help": "data.format=ranked: weight each induced pair's loss by its score gap over the mean "
            "training gap (gap), or weight all pairs 1 (none)."
        },
    )

    def __post_init__(self) -> None:
        check_range("algo.beta", self.beta, 0, lo_open=True)
        check_range("algo.nll_weight", self.nll_weight, 0)


@dataclass
class ReferenceSection:
    """The frozen reference policy and its log-prob cache."""

    path: str | None = field(
        default=None, metadata={"help": "Reference model; null = the initial policy (model.*)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Reference log-prob cache dir; null = $POSTTRAIN_CACHE/reference_logps."},
    )
    micro_batch_size: int = field(
        default=32, metadata={"help": "Pairs per reference forward when filling the cache."}
    )


def _optim(lr: float, warmup: int = 10) -> OptimSection:
    return OptimSection(lr=lr, warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1)


def _run(name: str) -> RunSection:
    return RunSection(output_dir=f"runs/{name}")


@dataclass
class SFTConfig:
    """Supervised fine-tuning with a completion-only loss (posttrain sft)."""

    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "Model to train."})
    data: SFTDataSection = field(default_factory=SFTDataSection, metadata={"help": "Training data."})
    train: GenerativeTrainSection = field(
        default_factory=GenerativeTrainSection, metadata={"help": "Steps and batches."}
    )
    algo: SFTAlgoSection = field(default_factory=SFTAlgoSection, metadata={"help": "SFT options."})
    optim: OptimSection = field(default_factory=lambda: _optim(2e-3), metadata={"help": "Optimizer."})
    run: RunSection = field(default_factory=lambda: _run("sft"), metadata={"help": "Outputs and logging."})


@dataclass
class _ValueModelCommand:
    """What `posttrain rm` and `posttrain prm` share: a value model trained on every weight."""

    model: ValueModelSection = field(
        default_factory=ValueModelSection, metadata={"help": "Backbone to start from (all weights trained)."}
    )
    data: OfflineDataSection = field(default_factory=OfflineDataSection, metadata={"help": "Training data."})
    train: OfflineTrainSection = field(
        default_factory=lambda: OfflineTrainSection(steps=200), metadata={"help": "Steps and batches."}
    )
    optim: OptimSection = field(default_factory=lambda: _optim(1e-3), metadata={"help": "Optimizer."})


@dataclass
class RMConfig(_ValueModelCommand):
    """Outcome reward model: Bradley–Terry on prompt/chosen/rejected pairs, or pointwise
    regression on prompt/completion/score rows (posttrain rm)."""

    data: OfflineDataSection = field(
        default_factory=OfflineDataSection, metadata={"help": "Preference data."}
    )
    algo: RMAlgoSection = field(default_factory=RMAlgoSection, metadata={"help": "Reward-model options."})
    run: RunSection = field(default_factory=lambda: _run("rm"), metadata={"help": "Outputs and logging."})


@dataclass
class PRMConfig(_ValueModelCommand):
    """Process reward model trained on stepwise labels (posttrain prm)."""

    data: OfflineDataSection = field(
        default_factory=lambda: OfflineDataSection(difficulty=3), metadata={"help": "Stepwise data."}
    )
    algo: PRMAlgoSection = field(default_factory=PRMAlgoSection, metadata={"help": "PRM options."})
    run: RunSection = field(default_factory=lambda: _run("prm"), metadata={"help": "Outputs and logging."})


@dataclass
class DPOConfig:
    """Offline preference optimization: DPO, IPO, SimPO, LN-DPO, hinge (posttrain dpo)."""

    model: ModelSection = field(
        default_factory=ModelSection, metadata={"help": "Policy to train (usually an SFT model)."}
    )
    ref: ReferenceSection = field(
        default_factory=ReferenceSection, metadata={"help": "Reference model and cache."}
    )
    data: PreferenceDataSection = field(
        default_factory=PreferenceDataSection, metadata={"help": "Preference data."}
    )
    train: GenerativeTrainSection = field(
        default_factory=lambda: GenerativeTrainSection(steps=100, eval_every=50),
        metadata={"help": "Steps and batches."},
    )
    algo: PreferenceAlgoSection = field(
        default_factory=PreferenceAlgoSection, metadata={"help": "Loss options."}
    )
    optim: OptimSection = field(
        default_factory=lambda: _optim(1e-4, warmup=5), metadata={"help": "Optimizer."}
    )
    run: RunSection = field(default_factory=lambda: _run("dpo"), metadata={"help": "Outputs and logging."})
