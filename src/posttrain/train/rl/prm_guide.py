"""`rollout.prm_guide`: a trained PRM stops, or truncates and resamples, RL rollouts whose
step scores fall (engines/rollout/prm_guide.py has the mechanism; docs/rl.md the usage).

The section, its checks (one-line ConfigErrors before any model is built), the wrapping of
the rollout engine, and the step's metrics from the engine's running totals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from posttrain.algos.spec import RLSpec
from posttrain.errors import ConfigError
from posttrain.train.config.checks import setting

DEFAULT_MAX_RESAMPLES = 2


@dataclass
class PRMGuideSection:
    """PRM-guided early stop / truncate-and-resample during rollout (null model_path = off)."""

    model_path: str | None = setting(
        None, "A PRM saved by `posttrain prm` (run_dir/final); null = no guidance."
    )
    threshold: float | None = setting(None, "A step scoring PRM(x, y<=t) below this is bad; null = rule off.")
    patience: int = setting(0, "A step ending this many score drops in a row is bad; 0 = rule off.")
    mode: Literal["stop", "resample"] = setting(
        "stop",
        "stop: end the sample at its bad step (finish reason prm_stop); resample: cut it after its "
        "last good step and sample again from there.",
    )
    max_resamples: int | None = setting(
        None,
        f"Truncations per sample in resample mode (null = {DEFAULT_MAX_RESAMPLES}); after them the sample "
        "is stopped at its next bad step.",
    )
    batch_size: int = setting(16, "Traces per PRM forward.")


def check_prm_guide(cfg, spec: RLSpec) -> None:
    """rollout.prm_guide: consistent settings, no untested combination."""
    g = cfg.rollout.prm_guide
    if g.model_path is None:
        changed = [k for k, v in (("threshold", g.threshold is not None), ("patience", g.patience != 0),
                                  ("mode", g.mode != "stop"), ("max_resamples", g.max_resamples is not None),
                                  ("batch_size", g.batch_size != 16)) if v]  # fmt: skip
        if changed:
            raise ConfigError(
                f"rollout.prm_guide.{changed[0]} needs rollout.prm_guide.model_path (a trained PRM)"
            )
        return
    if g.threshold is None and g.patience == 0:
        raise ConfigError("rollout.prm_guide: set threshold and/or patience (the rule that marks a step bad)")
    if g.threshold is not None and not 0.0 < g.threshold < 1.0:
        raise ConfigError(f"rollout.prm_guide.threshold must be in (0, 1) (a PRM score), got {g.threshold}")
    if g.patience < 0 or g.batch_size < 1:
        raise ConfigError(
            f"rollout.prm_guide.patience must be >= 0 and batch_size >= 1, got {g.patience}, {g.batch_size}"
        )
    if g.mode == "stop" and g.max_resamples is not None:
        raise ConfigError("rollout.prm_guide.max_resamples applies to mode resample only, not mode stop")
    if g.max_resamples is not None and g.max_resamples < 1:
        raise ConfigError(f"rollout.prm_guide.max_resamples must be >= 1, got {g.max_resamples}")
    untested = [name for name, on in (
        ("env.name (multi-turn environment)", cfg.env.name is not None),
        ("rollout.thinking_budget", cfg.rollout.thinking_budget > 0),
        ("rollout.repetition_ngram (counted per round, not per sample)", cfg.rollout.repetition_ngram > 0),
        ("algo.keep_sampling_mask", bool(spec.keep_sampling_mask)),
    ) if on]  # fmt: skip
    if untested:
        raise ConfigError(f"rollout.prm_guide is not supported with {', '.join(untested)}")


def check_prm_guide_path(cfg) -> None:
    """The PRM directory exists: checked when the run starts, before any model is built (not
    in validate, so a recipe whose PRM an earlier stage writes dry-runs cleanly)."""
    path = cfg.rollout.prm_guide.model_path
    if path is not None and not os.path.isdir(path):
        raise ConfigError(f"rollout.prm_guide.model_path: no PRM directory at {path!r}")


def wrap_engine(engine, tokenizer, cfg):
    """`engine` guided by the PRM of cfg.rollout.prm_guide (unchanged when it is off)."""
    g = cfg.rollout.prm_guide
    if g.model_path is None:
        return engine
    from posttrain.data.rewards.models import prm_reward
    from posttrain.engines.rollout.prm_guide import PRMGuidedEngine

    prm = prm_reward(model_path=g.model_path, batch_size=g.batch_size, device=cfg.model.device)
    return PRMGuidedEngine(
        engine, tokenizer, prm.scored_steps, step_separator=prm.step_separator, threshold=g.threshold,
        patience=g.patience, mode=g.mode,
        max_resamples=(g.max_resamples or DEFAULT_MAX_RESAMPLES) if g.mode == "resample" else 0,
    )  # fmt: skip


def prm_guide_metrics(before: dict[str, int], after: dict[str, int], max_new_tokens: int) -> dict[str, float]:
    """This step's rollout/prm_* metrics from the engine's totals before and after it.

    stop_frac / resampled_frac: share of the samples generated (dropped groups too) that a
    PRM stopped / truncated at least once; resamples: truncations; tokens_discarded: tokens
    sampled and then cut away by truncations; tokens_saved: budget stopped samples did not
    use, Σ (max_new_tokens − length), an upper bound on the tokens the stops saved.
    """
    d = {k: after[k] - before.get(k, 0) for k in after}
    n = max(1, d["samples"])
    return {
        "rollout/prm_stop_frac": d["stopped"] / n,
        "rollout/prm_resampled_frac": d["resampled"] / n,
        "rollout/prm_resamples": float(d["resamples"]),
        "rollout/prm_tokens_discarded": float(d["tokens_discarded"]),
        "rollout/prm_tokens_saved": float(d["tokens_saved"]),
        "rollout/prm_tokens_saved_frac": d["tokens_saved"] / (n * max_new_tokens),
    }
