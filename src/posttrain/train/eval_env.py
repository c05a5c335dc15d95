"""`posttrain eval` with an `env:` section: a tool-using model evaluated the way it is trained.

The section is the one of `posttrain rl` (train/config/rl.py `EnvSection`, checked by the
same `check_env_section`). With `env.name` set, the eval engine is wrapped in the
multi-turn driver (engines/rollout/multiturn.py) exactly as the RL loop wraps its engine:
the environment's tools are declared in the rendered prompts (the chat template's tool
block), each prompt's row ({"prompt", "answer"}) goes to the environment's reset, and
every model turn is answered by the environment until it ends the episode, `max_turns`
or `max_total_tokens`. The verifier scores the whole transcript (calls, tool results and
answer), as the `task` reward does in training.

Besides the usual metrics, eval.json then has the RL loop's per-step tool metrics over
every sample: ``tools/turns_mean``, ``tools/call_rate`` (share of samples with at least
one call), ``tools/calls_per_sample``, ``tools/error_rate`` (tool errors per call) and
``env/return_mean`` (the environment's own summed rewards).
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError


def check_eval_env(cfg) -> None:
    """One-line ConfigError for an `env:` section `posttrain eval` cannot honour (before any model)."""
    from posttrain.train.config.rl_checks import check_env_section

    env = cfg.env
    instance = check_env_section(env)
    if instance is None:
        return
    if env.dense_rewards:
        raise ConfigError(
            "env.dense_rewards: posttrain eval trains nothing, so per-turn rewards have no place to go "
            "(their sum is reported as env/return_mean); remove it"
        )
    if cfg.sampling.thinking_budget:
        raise ConfigError(
            "sampling.thinking_budget is not supported with a multi-turn environment (env.name)"
        )
    if hasattr(instance, "dataset_rows"):
        raise ConfigError(
            f"env.name: environment {env.name!r} brings its own prompts; posttrain eval scores "
            "data.task / data.path answers, so evaluate it with posttrain rl's eval instead"
        )


def env_engine(cfg, engine, tokenizer, rows: list[dict]) -> tuple[Any, dict[str, Any]]:
    """(`engine` wrapped in the multi-turn driver, generate_samples' env keywords) for
    cfg.env; (engine, {}) without env.name."""
    env = cfg.env
    if env.name is None:
        return engine, {}
    from posttrain.data.envs import make_env
    from posttrain.engines.rollout.multiturn import MultiTurnEngine

    options = {**env.options, **({"tools": list(env.tools)} if env.name == "tools" else {})}
    factory = lambda: make_env(env.name, **options)  # noqa: E731
    driver = MultiTurnEngine(engine, tokenizer, factory, max_turns=env.max_turns,
                             max_total_tokens=env.max_total_tokens)  # fmt: skip
    return driver, {"tools": driver.tool_schemas() or None, "rows": rows, "turn_stats": {}}


def env_metrics(env_kw: dict[str, Any]) -> dict[str, float]:
    """The tool metrics of the module docstring ({} without an environment)."""
    from posttrain.engines.rollout.multiturn import turn_metrics

    stats = env_kw.get("turn_stats")
    return turn_metrics(stats) if stats else {}
