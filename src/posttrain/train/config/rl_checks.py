"""Validation of an RLConfig (`validate`), run before any model is built.

`validate(cfg)` turns every bad combination into a one-line ConfigError naming the key
(unknown method/piece names or registry-entry options with suggestions, an estimator that
reads critic values without a critic, one that compares samples of a prompt with G < 2,
batch sizes that do not divide, an unknown KL estimator, ...) and returns the resolved
spec. What an estimator reads comes from its registry metadata (`ADVANTAGES.needs`), not
from lists of names here.
The sections themselves are in rl_config.py, which re-exports `validate`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from posttrain.errors import ConfigError
from posttrain.train.common.alerts import check_alerts
from posttrain.train.config.checks import MAX_LR, check_preset, check_range, check_sampling
from posttrain.train.config.ray import check_ray
from posttrain.train.rl.async_rollouts import check_async
from posttrain.train.rl.prm_guide import check_prm_guide

if TYPE_CHECKING:
    from posttrain.algos.spec import RLSpec
    from posttrain.train.config.rl import RLConfig, RolloutSection


def check_ref_refresh(cfg, spec: RLSpec) -> None:
    """algo.ref_refresh_every needs a reference in use and a policy that is not LoRA."""
    n = cfg.algo.ref_refresh_every
    if n < 0:
        raise ConfigError(f"algo.ref_refresh_every must be >= 0 (0 = never), got {n}")
    if n and not spec.uses_reference:
        raise ConfigError(
            "algo.ref_refresh_every refreshes the KL reference, but this config has none "
            f"(kl_placement {spec.kl_placement!r}, kl_coef {spec.kl_coef}); set a KL term or drop it"
        )
    if n and cfg.model.lora_r > 0:
        raise ConfigError(
            "algo.ref_refresh_every is not supported with LoRA: π_ref is the base model with adapters off, "
            "so a refresh would have to merge the adapters into the base and restart them"
        )


def check_trust_region(cfg, spec: RLSpec) -> None:
    """TRPO takes one natural step per batch on its own surrogate: settings of the other
    policy losses would do nothing, so they are errors."""
    if spec.trust_region is None:
        return
    if spec.trust_region <= 0 or spec.cg_iters < 1 or spec.cg_damping < 0 or spec.backtrack_steps < 1:
        raise ConfigError(
            "algo.trust_region must be > 0, cg_iters >= 1, cg_damping >= 0, backtrack_steps >= 1; got "
            f"{spec.trust_region}, {spec.cg_iters}, {spec.cg_damping}, {spec.backtrack_steps}"
        )
    if spec.update_epochs != 1 or spec.num_minibatches != 1:
        raise ConfigError(
            "algo.trust_region (TRPO) takes one step per batch: set update_epochs 1, num_minibatches 1"
        )
    a = cfg.algo
    unused = [name for name, on in (
        ("algo.policy_loss", a.policy_loss is not None), ("algo.clip_eps_low", a.clip_eps_low is not None),
        ("algo.clip_eps_high", a.clip_eps_high is not None), ("algo.dual_clip", spec.dual_clip is not None),
        ("algo.tis_cap", spec.tis_cap is not None), ("algo.off_policy_kl_threshold", spec.off_policy_kl_threshold is not None),
        ("algo.keep_sampling_mask", spec.keep_sampling_mask), ("algo.entropy_coef", spec.entropy_coef > 0),
        ("algo.kl_placement loss", spec.kl_placement == "loss"), ("algo.teacher_mode loss", spec.teacher_mode == "loss"),
    ) if on]  # fmt: skip
    if unused:
        raise ConfigError(
            f"algo.trust_region (TRPO) steps on its own surrogate E[ratio * A]; {', '.join(unused)} would do nothing"
        )


# algo.<field> -> (the piece naming the registry entry, the need that reads the field).
SPEC_INPUTS = {
    "gamma": ("advantage", "gamma"),
    "lam": ("advantage", "lam"),
    "baseline_momentum": ("advantage", "baseline"),
    "clip_eps_low": ("policy_loss", "clip_eps_low"),
    "clip_eps_high": ("policy_loss", "clip_eps_high"),
    "dual_clip": ("policy_loss", "dual_clip"),
}


def check_unread_settings(cfg, spec: RLSpec) -> None:
    """A spec-level setting the user gave that the chosen estimator or loss does not read
    (its registry `needs`) would do nothing: a ConfigError naming the key."""
    from posttrain.core.advantages import ADVANTAGES
    from posttrain.core.policy_losses import POLICY_LOSSES

    registries = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES}
    for key, (piece, need) in SPEC_INPUTS.items():
        name = getattr(spec, piece)
        needs = registries[piece].needs(name)
        if getattr(cfg.algo, key) is not None and need not in needs:
            raise ConfigError(
                f"algo.{key} does nothing with algo.{piece} {name!r}, which reads "
                f"{', '.join(sorted(needs)) or 'none of the spec-level inputs'}; drop it or pick a {piece} that uses it"
            )


def check_thinking_budget(cfg, spec: RLSpec) -> None:
    """rollout.thinking_budget: >= 0, and not with keep masks or a multi-turn environment."""
    budget = cfg.rollout.thinking_budget
    if budget < 0 or (budget and spec.keep_sampling_mask):
        raise ConfigError(
            f"rollout.thinking_budget must be >= 0 (0 = off) and cannot be combined with algo.keep_sampling_mask "
            f"(inserted tokens have no sampler support), got {budget}"
        )
    if budget and cfg.env.name is not None:
        raise ConfigError(
            "rollout.thinking_budget is not supported with a multi-turn environment (env.name): the budget "
            "would apply to each turn's generation, which is untested"
        )


def token_reward_advantages() -> list[str]:
    """The advantage estimators that read `token_rewards` (their registry `needs`). The
    group/leave-one-out ones (grpo, rloo, kimi, ...) only see the summed score, so a dense
    reward would silently vanish under them."""
    from posttrain.core.advantages import ADVANTAGES

    return [name for name in ADVANTAGES if "token_rewards" in ADVANTAGES.needs(name)]


def check_dense_reward(name: str, advantage: str, method: str) -> None:
    """ConfigError unless `advantage` can use the dense reward `name` (token rewards)."""
    from posttrain.core.advantages import ADVANTAGES

    if "token_rewards" not in ADVANTAGES.needs(advantage):
        raise ConfigError(
            f"reward {name!r} is dense (per-step token rewards) but algo.method {method!r} uses advantage "
            f"{advantage!r}, which ignores token rewards; use one of {', '.join(token_reward_advantages())} "
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

    # unknown method / advantage / policy loss, unknown or ill-typed options -> ConfigError
    spec = cfg.algo.pieces()
    _registry_check(AGGREGATIONS, spec.aggregation, "algo.aggregation")
    _registry_check(KL_ESTIMATORS, spec.kl_estimator, "algo.kl_estimator")
    ro = cfg.rollout
    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")
    if ro.prompts_per_step < 1 or ro.group_size < 1:
        raise ConfigError(
            f"rollout.prompts_per_step and rollout.group_size must be >= 1, got {ro.prompts_per_step}, {ro.group_size}"
        )
    if ro.shards < 0:
        raise ConfigError(f"rollout.shards must be >= 0 (0 = the number of processes), got {ro.shards}")
    _check_rollout(ro)
    check_ray(cfg)
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
    if "group_id" in ADVANTAGES.needs(spec.advantage) and ro.group_size < 2:
        raise ConfigError(
            f"algo.advantage {spec.advantage!r} compares samples of one prompt: rollout.group_size must be >= 2, got {ro.group_size}"
        )
    if spec.dynamic_sampling and ro.group_size < 2:
        raise ConfigError("algo.dynamic_sampling drops zero-variance groups: rollout.group_size must be >= 2")
    if "values" in ADVANTAGES.needs(spec.advantage) and not spec.critic:
        raise ConfigError(
            f"algo.method {cfg.algo.method!r} with advantage {spec.advantage!r} needs a critic (it reads values): set algo.critic=true"
        )
    batch = ro.prompts_per_step * ro.group_size
    mb = spec.num_minibatches
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
    if spec.update_epochs < 1:
        raise ConfigError(f"algo.update_epochs must be >= 1, got {spec.update_epochs}")
    if spec.kl_placement not in ("none", "reward", "loss"):
        raise ConfigError(f"algo.kl_placement must be none | reward | loss, got {spec.kl_placement!r}")
    if spec.kl_placement == "reward" and spec.kl_estimator not in ("k1", "k2", "k3"):
        raise ConfigError(
            f"algo.kl_estimator {spec.kl_estimator!r} is a loss-side estimator; with algo.kl_placement=reward use k1, k2 or k3"
        )
    if spec.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef must be >= 0, got {spec.kl_coef}")
    check_ref_refresh(cfg, spec)
    check_trust_region(cfg, spec)
    check_unread_settings(cfg, spec)
    check_alerts(cfg.alerts)
    if spec.teacher_mode != "none" and not (cfg.teacher.path or cfg.teacher.preset):
        raise ConfigError(f"algo.teacher_mode {spec.teacher_mode!r} needs a teacher: set teacher.path")
    if cfg.data.path is None and not cfg.data.task and not _env_provides_prompts(cfg):
        raise ConfigError(
            "data: set data.task or data.path (or an env.name whose environment provides prompts)"
        )
    from posttrain.train.rl.eval import check_eval

    check_eval(cfg)
    if not cfg.rewards and spec.teacher_mode != "reward":
        raise ConfigError(
            "rewards: at least one reward is needed (only on-policy distillation runs without one)"
        )
    from posttrain.data.rewards import REWARDS

    for i, reward in enumerate(cfg.rewards):
        if not abs(reward.weight) <= 1e6:  # runner.MAX_ABS_REWARD; NaN fails too
            raise ConfigError(f"rewards[{i}].weight must be a finite number within ±1e6, got {reward.weight}")
        check_range(f"rewards[{i}].start_step", reward.start_step, 0)
        if reward.name not in REWARDS and ":" not in reward.name:  # "module:function" imports at build
            raise ConfigError(f"rewards[{i}].name: {REWARDS.unknown_message(reward.name)}")
        if "dense" in reward.options and not _dense_option(reward.name):
            dense = [name for name in REWARDS if _dense_option(name)]
            raise ConfigError(
                f"rewards[{i}].options.dense: only the {' / '.join(dense)} reward is dense (RewardInfo.dense_option), "
                f"not {reward.name!r}"
            )
        if "dense" in reward.options and not isinstance(reward.options["dense"], bool):
            raise ConfigError(
                f"rewards[{i}].options.dense must be true or false, got {reward.options['dense']!r}"
            )
        if reward.options.get("dense"):
            check_dense_reward(reward.name, spec.advantage, cfg.algo.method)
            if cfg.data.success_reward == reward.name:
                raise ConfigError(
                    f"data.success_reward {reward.name!r} is dense (no per-sample score); name a scalar reward"
                )
    names = [reward.name for reward in cfg.rewards]
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
    check_thinking_budget(cfg, spec)
    check_prm_guide(cfg, spec)
    check_async(cfg, spec)
    if spec.keep_sampling_mask and ro.engine != "native":
        raise ConfigError("algo.keep_sampling_mask needs rollout.engine=native (the keep mask is [B, T, V])")
    _validate_env(cfg, spec)
    return spec


def _dense_option(name: str) -> bool:
    """Whether reward `name` is registered with a `dense` option (data/rewards RewardInfo)."""
    from posttrain.data.rewards import REWARDS, SCALAR

    return name in REWARDS and (REWARDS.info(name) or SCALAR).dense_option


def _env_provides_prompts(cfg: RLConfig) -> bool:
    """Whether cfg.env's environment has prompt rows of its own (`dataset_rows`)."""
    if cfg.env.name is None:
        return False
    from posttrain.data.envs import ENVIRONMENTS

    if cfg.env.name not in ENVIRONMENTS:
        return False  # _validate_env names the error
    return hasattr(ENVIRONMENTS[cfg.env.name](**cfg.env.options), "dataset_rows")


def _validate_env(cfg: RLConfig, spec: RLSpec) -> None:
    """The env section, checked before any model is built."""
    env = cfg.env
    instance = check_env_section(env)
    if instance is None:
        return
    if spec.keep_sampling_mask:
        raise ConfigError("algo.keep_sampling_mask is not supported with env (multi-turn rollouts)")
    if env.dense_rewards:  # per-turn rewards reach only token-reward estimators
        check_dense_reward("env.dense_rewards", spec.advantage, cfg.algo.method)
    elif getattr(instance, "gives_rewards", False) and "env_return" not in [r.name for r in cfg.rewards]:
        raise ConfigError(
            f"environment {env.name!r} gives rewards that this run would ignore: add the reward "
            "{name: env_return} (the summed rewards as the score) or set env.dense_rewards true"
        )


def check_env_section(env):
    """An `env:` section's name, limits, tools and options (shared by `posttrain rl` and
    `posttrain eval`): one-line ConfigError naming the key; returns an environment built
    from it (an invalid option value fails here, before any model), None without env.name."""
    if env.name is None:
        return None
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
    options = {**env.options, **({"tools": list(env.tools)} if env.name == "tools" else {})}
    return ENVIRONMENTS[env.name](**options)
