"""Checks of RLConfig settings added with issue 21 (reference refresh, TRPO), kept out of
rl_config.py to keep it short; `rl_config.validate` calls them. One-line ConfigErrors."""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError


def uses_reference(p: dict[str, Any]) -> bool:
    """Whether the resolved pieces read π_ref (a KL term that can be non-zero)."""
    return p["kl_placement"] != "none" and (p["kl_coef"] > 0 or p["kl_target"] is not None)


def check_ref_refresh(cfg, p: dict[str, Any]) -> None:
    """algo.ref_refresh_every needs a reference in use and a policy that is not LoRA."""
    n = cfg.algo.ref_refresh_every
    if n < 0:
        raise ConfigError(f"algo.ref_refresh_every must be >= 0 (0 = never), got {n}")
    if n and not uses_reference(p):
        raise ConfigError(
            "algo.ref_refresh_every refreshes the KL reference, but this config has none "
            f"(kl_placement {p['kl_placement']!r}, kl_coef {p['kl_coef']}); set a KL term or drop it"
        )
    if n and cfg.model.lora_r > 0:
        raise ConfigError(
            "algo.ref_refresh_every is not supported with LoRA: π_ref is the base model with adapters off, "
            "so a refresh would have to merge the adapters into the base and restart them"
        )


def check_trust_region(cfg, p: dict[str, Any]) -> None:
    """TRPO takes one natural step per batch on its own surrogate: settings of the other
    policy losses would do nothing, so they are errors."""
    if p["trust_region"] is None:
        return
    if p["trust_region"] <= 0 or p["cg_iters"] < 1 or p["cg_damping"] < 0 or p["backtrack_steps"] < 1:
        raise ConfigError(
            "algo.trust_region must be > 0, cg_iters >= 1, cg_damping >= 0, backtrack_steps >= 1; got "
            f"{p['trust_region']}, {p['cg_iters']}, {p['cg_damping']}, {p['backtrack_steps']}"
        )
    if p["update_epochs"] != 1 or p["num_minibatches"] != 1:
        raise ConfigError(
            "algo.trust_region (TRPO) takes one step per batch: set update_epochs 1, num_minibatches 1"
        )
    a = cfg.algo
    unused = [name for name, on in (
        ("algo.policy_loss", a.policy_loss is not None), ("algo.clip_eps_low", a.clip_eps_low is not None),
        ("algo.clip_eps_high", a.clip_eps_high is not None), ("algo.dual_clip", p["dual_clip"] is not None),
        ("algo.tis_cap", p["tis_cap"] is not None), ("algo.off_policy_kl_threshold", p["off_policy_kl_threshold"] is not None),
        ("algo.keep_sampling_mask", p["keep_sampling_mask"]), ("algo.entropy_coef", p["entropy_coef"] > 0),
        ("algo.kl_placement loss", p["kl_placement"] == "loss"), ("algo.teacher_mode loss", p["teacher_mode"] == "loss"),
    ) if on]  # fmt: skip
    if unused:
        raise ConfigError(
            f"algo.trust_region (TRPO) steps on its own surrogate E[ratio * A]; {', '.join(unused)} would do nothing"
        )


def check_thinking_budget(cfg, p: dict[str, Any]) -> None:
    """rollout.thinking_budget: >= 0, and not with keep masks or a multi-turn environment."""
    budget = cfg.rollout.thinking_budget
    if budget < 0 or (budget and p["keep_sampling_mask"]):
        raise ConfigError(
            f"rollout.thinking_budget must be >= 0 (0 = off) and cannot be combined with algo.keep_sampling_mask "
            f"(inserted tokens have no sampler support), got {budget}"
        )
    if budget and cfg.env.name is not None:
        raise ConfigError(
            "rollout.thinking_budget is not supported with a multi-turn environment (env.name): the budget "
            "would apply to each turn's generation, which is untested"
        )
