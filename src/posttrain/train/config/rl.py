"""`posttrain rl` configuration: one dataclass, every field documented, validated up front.

`RLConfig.algo.method` picks a named preset (posttrain.algos.presets.METHODS); every
`algo.<piece>` left at null takes the preset's value, and any piece set explicitly wins.
`validate(cfg)` (in rl_checks.py, re-exported here) turns every bad combination into a
one-line ConfigError before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.algos.presets import PIECE_DEFAULTS, resolve_pieces
from posttrain.engines.thinking import DEFAULT_PHRASE
from posttrain.train.common.alerts import AlertsSection
from posttrain.train.config.checks import setting
from posttrain.train.config.loader import ModelSection, OptimSection, RunSection
from posttrain.train.config.ray import RaySection

# Validation lives in rl_checks.py (which needs no section class at run time); re-exported.
from posttrain.train.config.rl_checks import check_dense_reward, token_reward_advantages, validate  # noqa: F401
from posttrain.train.rl.prm_guide import PRMGuideSection


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
    shards: int = setting(
        0,
        "Contiguous shards the step's prompts are sampled in, each with its own seed (0 = the "
        "number of processes, or of ray.rollout_workers with backend: ray): a run with shards=N in "
        "one process samples what N processes sample.",
    )
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
    max_staleness: int = setting(
        0,
        "Asynchronous RL: generation runs ahead of training by at most this many policy versions (the "
        "batch of step s is sampled with version max(0, s - max_staleness)); 0 = synchronous.",
    )
    partial_tokens: int = setting(
        0,
        "Partial rollouts (needs max_staleness >= 1): generate in segments of this many new tokens; segment j "
        "of step s uses version max(0, min(s - max_staleness + j, s)), recorded per token (with env.name every "
        "model turn is segmented and j runs on across turns); 0 = whole generations.",
    )
    async_timeout_s: float = setting(
        600.0,
        "max_staleness >= 1 in process: longest wait (seconds) for the rollout thread's next batch or for it "
        "to pause, before a TrainingError says it stalled (backend: ray uses ray.timeout_s).",
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
        dict,
        "The estimator's own options (e.g. grpo: scale, std_eps, unbiased_std), merged over the preset's; "
        "an unknown option or a wrong type is an error.",
        factory=True,
    )
    policy_loss: str | None = setting(
        None, "Policy loss (core POLICY_LOSSES): pg | ppo | gspo | cispo | kimi."
    )
    policy_loss_options: dict[str, Any] = setting(
        dict,
        "The policy loss's own options (e.g. kimi: beta; ppo: log_ratio_clamp), merged over the preset's; "
        "the clip bounds are algo.clip_eps_low/high and algo.dual_clip.",
        factory=True,
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
    backend: str = setting(
        "process",
        "Where the roles run: process (all in this process) | ray (each role a Ray actor, "
        "synchronous; needs pip install posttrain[ray]; docs/distributed.md).",
    )
    ray: RaySection = setting(RaySection, "Ray placement of the roles (backend: ray).", factory=True)
