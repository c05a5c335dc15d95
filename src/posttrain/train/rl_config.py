"""`posttrain rl` configuration: one dataclass, every field documented, validated up front.

`RLConfig.algo.method` picks a named preset (posttrain.algos.presets.METHODS); every
`algo.<piece>` left at null takes the preset's value, and any piece set explicitly wins.
`validate(cfg)` turns every bad combination into a one-line ConfigError before any model
is built (unknown method/piece names with suggestions, PPO without a critic, GRPO with
G < 2, batch sizes that do not divide, an unknown KL estimator, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.algos.presets import PIECE_DEFAULTS, resolve_pieces
from posttrain.engines.thinking import DEFAULT_PHRASE
from posttrain.errors import ConfigError
from posttrain.train.alerts import AlertsSection, check_alerts
from posttrain.train.config import ModelSection, OptimSection, RunSection
from posttrain.train.config_checks import MAX_LR, check_preset, check_range, check_sampling, setting
from posttrain.train.prm_guide import PRMGuideSection, check_prm_guide


@dataclass
class RLDataSection:
    """Where prompts come from: a synthetic task or a prompt-only dataset file."""

    task: str | None = setting(
        "arithmetic",
        "Synthetic task name (arithmetic | countdown | sorting | word_problems). With `path` set it "
        "only names the verifier of the dataset's `answer` column (the task reward, eval/accuracy); null = none.",
    )
    task_options: dict[str, Any] = setting(
        dict, "Keyword options passed to get_task(name, **options).", factory=True
    )
    difficulty: int | None = setting(None, "Task difficulty level; null = the task's mix of levels.")
    n_train: int = setting(1000, "Number of training prompts generated from the task.")
    seed: int | None = setting(
        None,
        "Seed of the generated task problems (train prompts and held-out set); null = run.seed. "
        "Fix it to vary run.seed (sampling, prompt order) over one problem set.",
    )
    n_test: int = setting(100, "Number of held-out prompts (task test split) for evaluation.")
    path: str | None = setting(
        None,
        "Prompt-only dataset (JSONL / Parquet / CSV / HF dir) with an `answer` column; extra columns go to rewards.",
    )
    test_path: str | None = setting(None, "Held-out prompt file for evaluation when `path` is used.")
    prompt_column: str = setting("prompt", "Column holding the prompt text.")
    max_prompt_tokens: int = setting(256, "Longest prompt allowed after the chat template.")
    long_prompts: Literal["error", "skip"] = setting(
        "error", "What to do with prompts over max_prompt_tokens."
    )
    chat_template: bool = setting(
        True,
        "Apply the tokenizer's chat template to each prompt; false uses the raw text. Either way "
        "the tokenizer's BOS convention applies once (a BOS-prepending tokenizer gives tokenizer(prompt)).",
    )
    enable_thinking: bool = setting(
        True, "Thinking mode of the chat template (false inserts an empty <think></think>)."
    )
    selection: Literal["shuffle", "curriculum", "success_rate"] = setting(
        "shuffle", "Prompt order: shuffled epochs, easy->hard curriculum, or Kimi success-rate sampling."
    )
    success_reward: str | None = setting(
        None,
        "Reward (by name in `rewards`) whose value is a sample's success for success-rate sampling, "
        "e.g. accuracy; null = the summed score clipped to [0, 1].",
    )
    difficulty_filter_k: int = setting(
        0,
        "Kimi / Qwen3 difficulty filter: before training, sample k responses per training prompt with the "
        "initial policy and keep only prompts solved at most `difficulty_filter_max_solved` times; 0 = off.",
    )
    difficulty_filter_max_solved: int = setting(
        0, "Difficulty filter: largest number of solved samples (of k) a kept prompt may have."
    )


@dataclass
class RolloutSection:
    """How responses are sampled."""

    engine: str = setting("native", "Rollout engine: native (shares the policy module) | hf | vllm.")
    prompts_per_step: int = setting(
        8, "Prompts per RL step; the batch is prompts_per_step x group_size sequences."
    )
    group_size: int = setting(4, "G: samples per prompt.")
    temperature: float = setting(1.0, "Sampling temperature (also used by the training log-prob forward).")
    top_p: float = setting(1.0, "Nucleus sampling; 1.0 disables.")
    top_k: int = setting(0, "Top-k sampling; 0 disables.")
    max_new_tokens: int = setting(64, "Response length budget (the overlong threshold).")
    stop_strings: list[str] = setting(list, "Decoded strings that end a response.", factory=True)
    repetition_ngram: int = setting(0, "Kimi early stop: n-gram size for repetition detection; 0 disables.")
    vllm_gpu_memory_utilization: float = setting(
        0.4, "engine=vllm: share of GPU memory vLLM may take (leave the rest for training when colocated)."
    )
    vllm_sleep_mode: bool = setting(
        False, "engine=vllm: release vLLM's weights and KV cache between generate calls (sleep level 1)."
    )
    thinking_budget: int = setting(
        0,
        "Qwen3 thinking budget: a sample still thinking after this many tokens gets thinking_end_phrase and "
        "</think> inserted (not trained on) and then answers; 0 = no budget.",
    )
    thinking_end_phrase: str = setting(
        DEFAULT_PHRASE, "Text inserted before </think> when the thinking budget cuts a sample."
    )
    prm_guide: PRMGuideSection = setting(
        PRMGuideSection,
        "A PRM stops, or truncates and resamples, samples whose step scores fall.",
        factory=True,
    )


@dataclass
class EnvSection:
    """Multi-turn rollouts: an environment answers each model turn (docs/tools.md)."""

    name: str | None = setting(None, "Environment (tools | verifiers); null = single-turn rollouts.")
    tools: list[str] = setting(
        lambda: ["calculator"], "Tools of the `tools` environment (calculator | python).", factory=True
    )
    options: dict[str, Any] = setting(
        dict,
        "Extra environment options, e.g. {error_reward: -0.1, tool_options: {python: {wall_time_s: 2}}}.",
        factory=True,
    )
    max_turns: int = setting(4, "Model turns per trajectory.")
    max_total_tokens: int = setting(
        256, "Response tokens per trajectory, model and observation tokens together."
    )
    dense_rewards: bool = setting(False, "Place each environment turn's reward at the turn's last token (token-reward "
                    "estimators only); otherwise use the env_return reward for the summed rewards.")  # fmt: skip


@dataclass
class AlgoSection:
    """The method preset and its pieces; null pieces take the preset's value."""

    method: str = setting(
        "grpo",
        "Named preset: reinforce | rloo | reinforce_pp | reinforce_pp_baseline | a2c | ppo | grpo | dr_grpo | dapo | gspo | cispo | kimi | on_policy_distill | kdrl.",
    )
    advantage: str | None = setting(
        None,
        "Advantage estimator (core ADVANTAGES): gae | grpo | dr_grpo | rloo | reinforce | reinforce_pp | reinforce_pp_baseline | kimi.",
    )
    advantage_options: dict[str, Any] = setting(
        dict, "Extra estimator options (e.g. scale, std_eps), merged over the preset's.", factory=True
    )
    policy_loss: str | None = setting(
        None, "Policy loss (core POLICY_LOSSES): pg | ppo | gspo | cispo | kimi."
    )
    policy_loss_options: dict[str, Any] = setting(
        dict, "Extra policy-loss options (e.g. beta for kimi), merged over the preset's.", factory=True
    )
    clip_eps_low: float | None = setting(None, "Lower ratio clip epsilon.")
    clip_eps_high: float | None = setting(None, "Upper ratio clip epsilon (DAPO clip-higher: 0.28).")
    dual_clip: float | None = setting(
        None, "Dual-clip constant c > 1 for negative advantages; null disables."
    )
    aggregation: str | None = setting(
        None,
        "Loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm.",
    )
    kl_placement: Literal["preset", "none", "reward", "loss"] = setting(
        "preset", "Where the KL to the reference goes: none, in the reward (k1 per token) or as a loss."
    )
    kl_estimator: str | None = setting(
        None,
        "KL estimator: k1 | k2 | k3 | k3_is as a loss (kl_placement=loss); k1 | k2 | k3 as the "
        "per-token reward penalty −β·k_t (kl_placement=reward).",
    )
    kl_coef: float | None = setting(None, "KL coefficient beta (initial value when adaptive).")
    kl_target: float | None = setting(None, "Adaptive KL controller target; null = fixed coefficient.")
    kl_horizon: int | None = setting(None, "Adaptive KL controller horizon (Ziegler et al. 2019).")
    entropy_coef: float | None = setting(None, "Entropy bonus weight.")
    update_epochs: int | None = setting(None, "Passes over each rollout batch (PPO epochs).")
    num_minibatches: int | None = setting(
        None, "Optimizer steps per epoch; the batch is split into this many minibatches."
    )
    micro_batch_size: int = setting(
        0, "Sequences per forward/backward (gradient accumulation); 0 = whole minibatch."
    )
    ref_refresh_every: int = setting(
        0,
        "Reset the KL reference π_ref to the current policy after every N steps (long R1-style runs); "
        "0 = never. Needs a reference in use (a KL term); not with LoRA.",
    )
    critic: bool | None = setting(None, "Train a value model (required by the gae estimator).")
    value_coef: float | None = setting(None, "Weight of the value loss.")
    value_clip: float | None = setting(None, "Value clipping range; null disables.")
    gamma: float | None = setting(None, "Discount for GAE / token-level returns.")
    lam: float | None = setting(None, "GAE lambda.")
    baseline_momentum: float | None = setting(None, "REINFORCE running-mean baseline momentum (EMA).")
    dynamic_sampling: bool | None = setting(
        None, "DAPO: drop zero-variance groups and keep generating until the batch is full."
    )
    max_gen_rounds: int | None = setting(
        None, "Extra generation rounds allowed to refill a dynamic-sampling batch."
    )
    overlong: Literal["preset", "none", "mask"] = setting(
        "preset",
        "Overlong responses (hit max_new_tokens): none, or mask them out of the loss (DAPO). For soft shaping add the dapo_overlong reward.",
    )
    teacher_mode: Literal["preset", "none", "reward", "loss"] = setting(
        "preset", "Teacher use: none, dense reverse-KL reward (on-policy distillation), or KDRL k2 loss."
    )
    teacher_reward_weight: float | None = setting(None, "Scale of the dense distillation reward.")
    kd_coef_start: float | None = setting(None, "KDRL beta at step 0.")
    kd_coef_end: float | None = setting(None, "KDRL beta after kd_anneal_steps.")
    kd_anneal_steps: int | None = setting(None, "KDRL annealing length in steps.")
    kd_anneal: Literal["preset", "linear", "cosine"] = setting("preset", "KDRL annealing shape.")
    kd_reward_threshold: float | None = setting(None, "KDRL: KD only on samples whose reward is below this.")
    tis_cap: float | None = setting(
        None, "Truncated importance sampling cap for sampler/trainer mismatch; null disables."
    )
    tis_level: Literal["preset", "token", "sequence"] = setting(
        "preset", "TIS weights per token or per sequence."
    )
    off_policy_kl_threshold: float | None = setting(
        None, "DeepSeek-V3.2 off-policy sequence masking threshold; null disables."
    )
    keep_sampling_mask: bool | None = setting(
        None, "Train over the sampler's kept top-p/top-k support (DeepSeek-V3.2)."
    )
    trust_region: float | None = setting(
        None,
        "TRPO: one natural-gradient policy step per batch, its mean token KL(π_old ‖ π_θ) <= this δ "
        "(conjugate gradient + line search); null = optimizer steps.",
    )
    cg_iters: int | None = setting(None, "TRPO: conjugate-gradient iterations (10).")
    cg_damping: float | None = setting(None, "TRPO: damping λ of the Fisher matrix (0.1).")
    backtrack_steps: int | None = setting(None, "TRPO: line-search tries, halving the step each time (10).")

    def pieces(self) -> dict[str, Any]:
        """The resolved piece settings (user override > preset > default)."""
        return resolve_pieces(self.method, {k: getattr(self, k) for k in PIECE_DEFAULTS})


@dataclass
class RewardSpec:
    """One reward function of the weighted sum."""

    name: str = setting(
        "task", "Reward name in REWARDS (task, accuracy, format, kimi_length, dapo_overlong, ...)."
    )
    weight: float = setting(1.0, "Weight in the summed score.")
    options: dict[str, Any] = setting(dict, "Keyword options for build_reward.", factory=True)
    start_step: int = setting(0, "Step from which the reward counts (Kimi: length reward switched on late).")


@dataclass
class RewardsSection:
    """Reward execution."""

    timeout_s: float = setting(
        10.0,
        "Deadline of one reward call: the whole batch first; when that times out or raises, each "
        "sample is scored alone under its own timeout_s, so a slow sample fails alone.",
    )
    max_workers: int = setting(2, "Parallel reward workers.")
    max_error_rate: float = setting(
        0.5,
        "Fraction of samples with a reward error (raised, timed out, non-finite or |score| > 1e6) "
        "tolerated per step before RewardError.",
    )


@dataclass
class AuxModelSection:
    """A second model: the teacher (and, with `CriticSection`, the critic's initialisation)."""

    path: str | None = setting(None, "Model path; null = from the policy (critic) / required (teacher).")
    preset: str | None = setting(None, "Random-init preset instead of a path (tests).")


@dataclass
class CriticSection(AuxModelSection):
    """The value model of PPO / A2C: where it starts from and its learning rate (the
    teacher is frozen, so `teacher` has no `lr`)."""

    lr: float | None = setting(None, "Critic learning rate; null = optim.lr.")


@dataclass
class RLEvalSection:
    """Held-out evaluation during training."""

    every: int = setting(0, "Evaluate every N steps; 0 = only before/after when `before_after`.")
    before_after: bool = setting(False, "Evaluate before the first and after the last step.")
    n: int = setting(64, "Held-out prompts per evaluation.")
    temperature: float = setting(0.0, "Evaluation sampling temperature (0 = greedy).")
    max_new_tokens: int = setting(0, "Evaluation length budget; 0 = rollout.max_new_tokens.")
    rewards: list[RewardSpec] = setting(
        list,
        "Rewards that score held-out samples, reported as eval/reward/<name> and eval/reward/mean; "
        "empty = the run's rewards when there is no data.task (a task reports eval/accuracy).",
        factory=True,
    )


@dataclass
class RLConfig:
    """Online RL (`posttrain rl`): PPO, GRPO and relatives as settings of one loop."""

    steps: int = setting(100, "RL steps (each: generate, reward, score, update).")
    model: ModelSection = setting(ModelSection, "The policy model.", factory=True)
    optim: OptimSection = setting(lambda: OptimSection(lr=1e-5), "Policy optimizer.", factory=True)
    run: RunSection = setting(
        lambda: RunSection(output_dir="runs/rl"), "Run directory, seed, checkpoints, logging.", factory=True
    )
    data: RLDataSection = setting(RLDataSection, "Prompts.", factory=True)
    rollout: RolloutSection = setting(RolloutSection, "Sampling.", factory=True)
    algo: AlgoSection = setting(AlgoSection, "Method and pieces.", factory=True)
    rewards: list[RewardSpec] = setting(
        lambda: [RewardSpec()], "Reward functions, summed with weights.", factory=True
    )
    reward_exec: RewardsSection = setting(RewardsSection, "Reward execution limits.", factory=True)
    critic: CriticSection = setting(CriticSection, "Value model (PPO/A2C).", factory=True)
    teacher: AuxModelSection = setting(
        AuxModelSection, "Teacher model (on-policy distillation, KDRL).", factory=True
    )
    eval: RLEvalSection = setting(RLEvalSection, "Held-out evaluation.", factory=True)
    env: EnvSection = setting(EnvSection, "Multi-turn environment (tools).", factory=True)
    alerts: AlertsSection = setting(
        AlertsSection, "Reward-hacking alerts: thresholds, stop on alert.", factory=True
    )
    log_entropy: bool = setting(
        True,
        "Compute the policy entropy metric every update even without an entropy bonus (costs one more pass over the logits).",
    )
    sample_log_every: int = setting(
        1, "Write rollouts with rewards to samples.jsonl every N steps; 0 disables."
    )
    samples_per_log: int = setting(4, "Rollouts written per samples.jsonl entry.")


# The advantage estimators that read `token_rewards` (core/advantages.py: GAE and the
# γ-return REINFORCE family). The group/leave-one-out ones (grpo, rloo, kimi, ...) only see
# the summed score, so a dense reward would silently vanish under them.
TOKEN_REWARD_ADVANTAGES = ("gae", "reinforce", "reinforce_pp", "reinforce_pp_baseline")


def check_dense_reward(name: str, advantage: str, method: str) -> None:
    """ConfigError unless `advantage` can use the dense reward `name` (token rewards)."""
    if advantage not in TOKEN_REWARD_ADVANTAGES:
        raise ConfigError(
            f"reward {name!r} is dense (per-step token rewards) but algo.method {method!r} uses advantage "
            f"{advantage!r}, which ignores token rewards; use one of {', '.join(TOKEN_REWARD_ADVANTAGES)} "
            "(e.g. method reinforce_pp or ppo) or drop options.dense"
        )


def _registry_check(registry, name: str, what: str) -> None:
    if name not in registry:
        raise ConfigError(f"{what}: {registry.unknown_message(name)}")


def _check_rollout(ro: RolloutSection) -> None:
    """One-line ConfigError naming the `rollout.*` key of a sampling setting that cannot work."""
    # RL samples, and the training forward divides the logits by the temperature: > 0.
    check_sampling("rollout", temperature=ro.temperature, max_new_tokens=ro.max_new_tokens, greedy_ok=False)
    check_range("rollout.top_p", ro.top_p, 0, 1, lo_open=True)
    if any(not s for s in ro.stop_strings):
        raise ConfigError(f"rollout.stop_strings must not contain an empty string, got {ro.stop_strings}")
    if ro.top_k < 0 or ro.repetition_ngram < 0:
        key = "top_k" if ro.top_k < 0 else "repetition_ngram"
        raise ConfigError(f"rollout.{key} must be >= 0, got {getattr(ro, key)}")


def validate(cfg: RLConfig) -> dict[str, Any]:
    """Check an RLConfig before any work; return the resolved pieces.

    Raises ConfigError (one line, naming the key) for the problems listed in the module doc.
    """
    from posttrain.core.advantages import ADVANTAGES
    from posttrain.core.kl import KL_ESTIMATORS
    from posttrain.core.masking import AGGREGATIONS
    from posttrain.core.policy_losses import POLICY_LOSSES
    from posttrain.train.rl_checks import check_ref_refresh, check_thinking_budget, check_trust_region

    p = cfg.algo.pieces()  # unknown method -> ConfigError with suggestion
    _registry_check(ADVANTAGES, p["advantage"], "algo.advantage")
    _registry_check(POLICY_LOSSES, p["policy_loss"], "algo.policy_loss")
    _registry_check(AGGREGATIONS, p["aggregation"], "algo.aggregation")
    _registry_check(KL_ESTIMATORS, p["kl_estimator"], "algo.kl_estimator")
    ro = cfg.rollout
    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")
    if ro.prompts_per_step < 1 or ro.group_size < 1:
        raise ConfigError(
            f"rollout.prompts_per_step and rollout.group_size must be >= 1, got {ro.prompts_per_step}, {ro.group_size}"
        )
    _check_rollout(ro)
    ev, ex = cfg.eval, cfg.reward_exec
    check_sampling("eval", temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, greedy_ok=True,
                   zero_tokens_ok=True)  # fmt: skip
    check_range("eval.n", ev.n, 0)
    check_range("eval.every", ev.every, 0)
    if not (math.isfinite(ex.timeout_s) and ex.timeout_s > 0) or ex.max_workers < 1:
        key = "max_workers" if ex.max_workers < 1 else "timeout_s"
        raise ConfigError(
            f"reward_exec.{key} must be {'>= 1' if key == 'max_workers' else '> 0'}, got {getattr(ex, key)}"
        )
    if not 0.0 <= ex.max_error_rate <= 1.0:
        raise ConfigError(f"reward_exec.max_error_rate must be in [0, 1], got {ex.max_error_rate}")
    if cfg.critic.lr is not None and not 0 < cfg.critic.lr <= MAX_LR:
        raise ConfigError(
            f"critic.lr must be a positive finite number <= {MAX_LR:g} (or null), got {cfg.critic.lr}"
        )
    for key, aux in (("critic", cfg.critic), ("teacher", cfg.teacher)):
        if aux.preset is not None and aux.path is None:
            check_preset(f"{key}.preset", aux.preset)
    if p["advantage"] in ("grpo", "dr_grpo", "rloo", "kimi", "reinforce_pp_baseline") and ro.group_size < 2:
        raise ConfigError(
            f"algo.advantage {p['advantage']!r} compares samples of one prompt: rollout.group_size must be >= 2, got {ro.group_size}"
        )
    if p["dynamic_sampling"] and ro.group_size < 2:
        raise ConfigError("algo.dynamic_sampling drops zero-variance groups: rollout.group_size must be >= 2")
    if p["advantage"] == "gae" and not p["critic"]:
        raise ConfigError(
            f"algo.method {cfg.algo.method!r} with advantage 'gae' needs a critic: set algo.critic=true"
        )
    batch = ro.prompts_per_step * ro.group_size
    mb = p["num_minibatches"]
    if mb < 1 or batch % mb:
        raise ConfigError(
            f"algo.num_minibatches={mb} must divide the batch of {batch} sequences (prompts_per_step x group_size)"
        )
    micro = cfg.algo.micro_batch_size
    if micro < 0 or (micro and (batch // mb) % micro):
        raise ConfigError(
            f"algo.micro_batch_size={micro} must divide the minibatch of {batch // mb} sequences"
        )
    if ro.engine != "vllm" and (ro.vllm_gpu_memory_utilization != 0.4 or ro.vllm_sleep_mode):
        raise ConfigError(
            f"rollout.vllm_gpu_memory_utilization / rollout.vllm_sleep_mode apply to rollout.engine=vllm, not {ro.engine!r}"
        )
    if not 0.0 < ro.vllm_gpu_memory_utilization <= 1.0:
        raise ConfigError(
            f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {ro.vllm_gpu_memory_utilization}"
        )
    if p["update_epochs"] < 1:
        raise ConfigError(f"algo.update_epochs must be >= 1, got {p['update_epochs']}")
    if p["kl_placement"] not in ("none", "reward", "loss"):
        raise ConfigError(f"algo.kl_placement must be none | reward | loss, got {p['kl_placement']!r}")
    if p["kl_placement"] == "reward" and p["kl_estimator"] not in ("k1", "k2", "k3"):
        raise ConfigError(
            f"algo.kl_estimator {p['kl_estimator']!r} is a loss-side estimator; with algo.kl_placement=reward use k1, k2 or k3"
        )
    if p["kl_coef"] < 0:
        raise ConfigError(f"algo.kl_coef must be >= 0, got {p['kl_coef']}")
    check_ref_refresh(cfg, p)
    check_trust_region(cfg, p)
    check_alerts(cfg.alerts)
    if p["teacher_mode"] != "none" and not (cfg.teacher.path or cfg.teacher.preset):
        raise ConfigError(f"algo.teacher_mode {p['teacher_mode']!r} needs a teacher: set teacher.path")
    if cfg.data.path is None and not cfg.data.task and not _env_provides_prompts(cfg):
        raise ConfigError(
            "data: set data.task or data.path (or an env.name whose environment provides prompts)"
        )
    from posttrain.train.rl_eval import check_eval

    check_eval(cfg)
    if not cfg.rewards and p["teacher_mode"] != "reward":
        raise ConfigError(
            "rewards: at least one reward is needed (only on-policy distillation runs without one)"
        )
    from posttrain.data.rewards import REWARDS

    for i, spec in enumerate(cfg.rewards):
        if not abs(spec.weight) <= 1e6:  # runner.MAX_ABS_REWARD; NaN fails too
            raise ConfigError(f"rewards[{i}].weight must be a finite number within ±1e6, got {spec.weight}")
        check_range(f"rewards[{i}].start_step", spec.start_step, 0)
        if spec.name not in REWARDS and ":" not in spec.name:  # "module:function" imports at build
            raise ConfigError(f"rewards[{i}].name: {REWARDS.unknown_message(spec.name)}")
        if "dense" in spec.options and spec.name != "prm":
            raise ConfigError(f"rewards[{i}].options.dense: only the prm reward is dense, not {spec.name!r}")
        if "dense" in spec.options and not isinstance(spec.options["dense"], bool):
            raise ConfigError(
                f"rewards[{i}].options.dense must be true or false, got {spec.options['dense']!r}"
            )
        if spec.options.get("dense"):
            check_dense_reward(spec.name, p["advantage"], cfg.algo.method)
            if cfg.data.success_reward == spec.name:
                raise ConfigError(
                    f"data.success_reward {spec.name!r} is dense (no per-sample score); name a scalar reward"
                )
    names = [spec.name for spec in cfg.rewards]
    if cfg.data.success_reward is not None and cfg.data.success_reward not in names:
        raise ConfigError(
            f"data.success_reward {cfg.data.success_reward!r} is not one of the configured rewards: {', '.join(names)}"
        )
    if cfg.data.difficulty_filter_k < 0 or not 0 <= cfg.data.difficulty_filter_max_solved < max(
        1, cfg.data.difficulty_filter_k
    ):
        raise ConfigError(
            "data.difficulty_filter_k must be >= 0 and 0 <= data.difficulty_filter_max_solved < "
            f"difficulty_filter_k, got {cfg.data.difficulty_filter_k} and {cfg.data.difficulty_filter_max_solved}"
        )
    check_thinking_budget(cfg, p)
    check_prm_guide(cfg, p)
    if p["keep_sampling_mask"] and ro.engine != "native":
        raise ConfigError("algo.keep_sampling_mask needs rollout.engine=native (the keep mask is [B, T, V])")
    _validate_env(cfg, p)
    return p


def _env_provides_prompts(cfg: RLConfig) -> bool:
    """Whether cfg.env's environment has prompt rows of its own (`dataset_rows`)."""
    if cfg.env.name is None:
        return False
    from posttrain.data.envs import ENVIRONMENTS

    if cfg.env.name not in ENVIRONMENTS:
        return False  # _validate_env names the error
    return hasattr(ENVIRONMENTS[cfg.env.name](**cfg.env.options), "dataset_rows")


def _validate_env(cfg: RLConfig, p: dict[str, Any]) -> None:
    """The env section, checked before any model is built."""
    env = cfg.env
    if env.name is None:
        return
    from posttrain.data.envs import ENVIRONMENTS, TOOLS

    if env.name not in ENVIRONMENTS:
        raise ConfigError(f"env.name: {ENVIRONMENTS.unknown_message(env.name)}")
    if env.max_turns < 1 or env.max_total_tokens < 1:
        raise ConfigError(
            f"env.max_turns and env.max_total_tokens must be >= 1, got {env.max_turns}, {env.max_total_tokens}"
        )
    for i, tool in enumerate(env.tools):
        if tool not in TOOLS:
            raise ConfigError(f"env.tools[{i}]: {TOOLS.unknown_message(tool)}")
    import inspect

    accepted = set(inspect.signature(ENVIRONMENTS[env.name]).parameters) - {"tools"}
    unknown = sorted(set(env.options) - accepted)
    if unknown:
        raise ConfigError(
            f"env.options: unknown option(s) {', '.join(unknown)} for environment {env.name!r}; "
            f"valid: {', '.join(sorted(accepted)) or 'none'}"
        )
    if p["keep_sampling_mask"]:
        raise ConfigError("algo.keep_sampling_mask is not supported with env (multi-turn rollouts)")
    options = {**env.options, **({"tools": list(env.tools)} if env.name == "tools" else {})}
    instance = ENVIRONMENTS[env.name](**options)  # an invalid option value fails here, before any model
    if env.dense_rewards:  # per-turn rewards reach only token-reward estimators
        check_dense_reward("env.dense_rewards", p["advantage"], cfg.algo.method)
    elif getattr(instance, "gives_rewards", False) and "env_return" not in [r.name for r in cfg.rewards]:
        raise ConfigError(
            f"environment {env.name!r} gives rewards that this run would ignore: add the reward "
            "{name: env_return} (the summed rewards as the score) or set env.dense_rewards true"
        )
