"""`RLSpec`: the resolved, frozen description of one online RL method.

Built once from `algo.*` and the method preset (`algos/presets.py`, user setting > preset >
the defaults below) by `train/config/rl_checks.validate`, then read by the controller and
the learners. Every algorithm of DESIGN.md §2 is one value of this dataclass: which
advantage estimator, which policy loss, where the KL goes, which aggregation, whether a
critic or a teacher exists.

A parameter goes from YAML to the math through three forms: the YAML value, the
`algo.<field>` config field, and the field of this spec (or of a registry entry's typed
options dataclass, `advantage_options` / `policy_loss_options`) that the loss receives.
Which spec fields reach which registry entry is the entry's `needs` (core/registry.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RLSpec:
    """One RL method, resolved. Field defaults apply when neither the preset nor the user sets one."""

    # advantage estimation (core/advantages.py)
    advantage: str = "grpo"  # ADVANTAGES entry
    # that entry's options: an instance of ADVANTAGES.options_type(advantage), built and
    # checked by `resolve_pieces` from `algo.advantage_options`; None = the entry's defaults
    advantage_options: Any = None
    gamma: float = 1.0  # discount γ
    lam: float = 0.95  # GAE λ
    baseline_momentum: float = 0.9  # REINFORCE running-mean baseline EMA
    # policy loss (core/policy_losses.py)
    policy_loss: str = "ppo"  # POLICY_LOSSES entry
    policy_loss_options: Any = None  # likewise, POLICY_LOSSES.options_type(policy_loss)
    clip_eps_low: float = 0.2  # ratio clip 1 − ε_low
    clip_eps_high: float = 0.2  # ratio clip 1 + ε_high (DAPO clip-higher)
    dual_clip: float | None = None  # dual-clip constant c (Ye et al. 2020); None = off
    aggregation: str = "token-mean"  # AGGREGATIONS entry (core/masking.py)
    entropy_coef: float = 0.0  # entropy bonus coefficient
    # KL to the reference policy (core/kl.py)
    kl_placement: str = "none"  # "none" | "reward" | "loss"
    kl_estimator: str = "k3"  # KL_ESTIMATORS entry
    kl_coef: float = 0.0  # β
    kl_target: float | None = None  # adaptive controller target KL; None = fixed β
    kl_horizon: int = 10000  # adaptive controller horizon
    # update schedule
    update_epochs: int = 1
    num_minibatches: int = 1
    # critic (core/value.py)
    critic: bool = False
    value_coef: float = 0.5
    value_clip: float | None = None
    # data filters
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups and refill
    max_gen_rounds: int = 3  # refill rounds of dynamic sampling
    overlong: str = "none"  # "none" | "mask" (drop truncated samples from the loss)
    # teacher (core/distill.py)
    teacher_mode: str = "none"  # "none" | "reward" (on-policy distillation) | "loss" (KDRL)
    teacher_reward_weight: float = 1.0
    kd_coef_start: float = 0.0
    kd_coef_end: float = 0.0
    kd_anneal_steps: int = 0
    kd_anneal: str = "linear"
    kd_reward_threshold: float = 0.5
    # sampler / trainer mismatch (DeepSeek-V3.2; core/policy_losses.py)
    tis_cap: float | None = None  # truncated importance-sampling cap
    tis_level: str = "token"
    off_policy_kl_threshold: float | None = None  # off-policy sequence masking δ
    keep_sampling_mask: bool = False  # train on the sampler's top-k/top-p support
    # TRPO (core/trpo.py): one natural-gradient step per batch
    trust_region: float | None = None  # max mean token KL δ; None = optimizer steps
    cg_iters: int = 10
    cg_damping: float = 0.1
    backtrack_steps: int = 10

    def as_dict(self) -> dict[str, Any]:
        """field -> value (for `--dry-run` and the run's config record); the typed options
        become dicts of their fields."""
        return dataclasses.asdict(self)

    @property
    def uses_reference(self) -> bool:
        """Whether a KL term to π_ref can be non-zero (so the reference must be built)."""
        return self.kl_placement != "none" and (self.kl_coef > 0 or self.kl_target is not None)

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps one RL step takes (epochs × minibatches)."""
        return self.update_epochs * self.num_minibatches


def spec_defaults() -> dict[str, Any]:
    """field -> default of every RLSpec field (what a preset may set)."""
    return RLSpec().as_dict()
