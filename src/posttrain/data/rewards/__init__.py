"""Reward functions for RL: a registry of factories and a parallel, deadline-bound runner.

A reward is a plain or async callable ``f(prompts, completions, **columns) ->
list[float | None]`` over a batch of B samples (None: not applicable to that sample).
Extra dataset columns (``answer``, ``tests``, ``group_id``, ``response_length`` …) arrive
as keyword arguments. `build_reward(name, **options)` builds one by name; `RewardRunner`
runs several with weights, each under a deadline, and turns failures into counted,
excluded samples (see runner.py). docs/rewards.md lists every reward and its options.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _lazy(module: str, factory: str) -> Callable[..., Callable]:
    """`factory(**options)` from `module`, imported only when the reward is built (the code
    sandbox and model-based rewards pull in more than a config check needs)."""

    def build(**options) -> Callable:
        import importlib

        return getattr(importlib.import_module(module), factory)(**options)

    return build


for _name, _module, _factory in (
    ("accuracy", "posttrain.data.rewards.accuracy", "AccuracyReward"),
    ("code", "posttrain.data.rewards.code", "code_reward"),
    ("reward_model", "posttrain.data.rewards.models", "reward_model_reward"),
    ("prm", "posttrain.data.rewards.models", "prm_reward"),
):
    REWARDS.register(_name)(_lazy(_module, _factory))


@REWARDS.register("kimi_length")
def _kimi_length(
    *, correctness: str | Callable | None = None, correctness_options: dict | None = None, **options
):
    # A reward name is built here so a YAML config can say correctness: accuracy.
    if isinstance(correctness, str):
        correctness = build_reward(correctness, **(correctness_options or {}))
    return kimi_length_reward(correctness=correctness, **options)


REWARDS.register("format")(format_reward)
REWARDS.register("length_linear")(length_linear_reward)
REWARDS.register("dapo_overlong")(dapo_overlong_reward)
REWARDS.register("repetition")(repetition_reward)
REWARDS.register("language")(language_reward)
REWARDS.register("task")(task_reward)
REWARDS.register("step_credit")(step_credit_reward)


@REWARDS.register("env_return")
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


__all__ = ["REWARDS", "RewardResult", "RewardRunner", "build_reward"]
