"""Reward functions for RL: a registry of factories and a parallel, deadline-bound runner.

A reward is a plain or async callable ``f(prompts, completions, **columns) ->
list[float | None]`` over a batch of B samples (None: not applicable to that sample).
Extra dataset columns (``answer``, ``tests``, ``group_id``, ``response_length`` …) arrive
as keyword arguments. `build_reward(name, **options)` builds one by name; `RewardRunner`
runs several with weights, each under a deadline, and turns failures into counted,
excluded samples (see runner.py). docs/rewards.md lists every reward and its options.

Each registered reward carries a `RewardInfo` (registry metadata, `REWARDS.info(name)`)
saying what validation and the loop must know before and after building it: whether it
can be dense (per-step token rewards instead of a score). `is_dense` answers for one
configured reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.core.registry import Registry
from posttrain.data.rewards.runner import RewardResult, RewardRunner
from posttrain.data.rewards.text import (
    dapo_overlong_reward,
    format_reward,
    kimi_length_reward,
    language_reward,
    length_linear_reward,
    repetition_reward,
    step_credit_reward,
    task_reward,
)
from posttrain.errors import ConfigError, RewardError

REWARDS: Registry = Registry("reward")


@dataclass(frozen=True)
class RewardInfo:
    """What is known about a registered reward without building it."""

    # Accepts `options.dense` (bool): true makes it a dense reward, per-step scores turned
    # into token rewards (the prm reward), instead of one score per sample.
    dense_option: bool = False


SCALAR = RewardInfo()


def is_dense(name: str, options: dict[str, Any], fn: Callable) -> bool:
    """Whether the configured reward `name` with `options` (built as `fn`) is dense.

    A registered reward is dense when its RewardInfo allows `options.dense` and the option
    is true. A user's ``"module:function"`` reward, which has no registry entry, marks
    itself dense with the attribute ``fn.dense = True`` (and then provides
    ``fn.scored_steps(prompts, completions)`` like the prm reward).
    """
    if name in REWARDS:
        info = REWARDS.info(name) or SCALAR  # registered without a RewardInfo: a scalar reward
        return info.dense_option and options.get("dense", False) is True
    return getattr(fn, "dense", False) is True


def _lazy(module: str, factory: str) -> Callable[..., Callable]:
    """`factory(**options)` from `module`, imported only when the reward is built (the code
    sandbox and model-based rewards pull in more than a config check needs)."""

    def build(**options) -> Callable:
        import importlib

        return getattr(importlib.import_module(module), factory)(**options)

    return build


for _name, _module, _factory, _info in (
    ("accuracy", "posttrain.data.rewards.accuracy", "AccuracyReward", SCALAR),
    ("code", "posttrain.data.rewards.code", "code_reward", SCALAR),
    ("reward_model", "posttrain.data.rewards.models", "reward_model_reward", SCALAR),
    ("prm", "posttrain.data.rewards.models", "prm_reward", RewardInfo(dense_option=True)),
):
    REWARDS.register(_name, info=_info)(_lazy(_module, _factory))


@REWARDS.register("kimi_length", info=SCALAR)
def _kimi_length(
    *, correctness: str | Callable | None = None, correctness_options: dict | None = None, **options
):
    # A reward name is built here so a YAML config can say correctness: accuracy.
    if isinstance(correctness, str):
        correctness = build_reward(correctness, **(correctness_options or {}))
    return kimi_length_reward(correctness=correctness, **options)


for _name, _factory in (
    ("format", format_reward),
    ("length_linear", length_linear_reward),
    ("dapo_overlong", dapo_overlong_reward),
    ("repetition", repetition_reward),
    ("language", language_reward),
    ("task", task_reward),
    ("step_credit", step_credit_reward),
):
    REWARDS.register(_name, info=SCALAR)(_factory)


@REWARDS.register("env_return", info=SCALAR)
def _env_return() -> Callable:
    """The environment's summed step rewards of each trajectory (multi-turn rollouts,
    `env.name`): a game's win/loss, a tool environment's error penalties."""

    def fn(prompts, completions, env_return=None, **columns):
        if env_return is None:
            raise RewardError("the env_return reward needs a multi-turn environment: set env.name")
        return [float(r) for r in env_return]

    return fn


def build_reward(name: str, **options) -> Callable:
    """Build the reward registered as `name` with its keyword options.

    An unknown name lists the valid ones; an unknown option names the reward and option.
    A name of the form ``"package.module:function"`` imports a user's reward (see
    `_import_reward`), so custom rewards work from YAML without touching the registry.
    """
    if ":" in name and name not in REWARDS:
        return _import_reward(name, options)
    factory = REWARDS[name]
    try:
        return factory(**options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e) or "missing" in str(e):
            raise ConfigError(f"reward {name!r}: {str(e).split(') ', 1)[-1]}") from None
        raise


def _import_reward(spec: str, options: dict) -> Callable:
    """A user's reward given as ``"package.module:name"`` (no registration needed).

    With no options, ``name`` is the reward itself, ``f(prompts, completions, **columns)``;
    with options, ``name`` is a factory called as ``name(**options)`` that returns one.
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn(**options) if options else fn


__all__ = ["REWARDS", "RewardInfo", "RewardResult", "RewardRunner", "build_reward", "is_dense"]
