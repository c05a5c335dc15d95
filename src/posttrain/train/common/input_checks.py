"""Checks of a run's data against its batch and its model, before anything trains.

- `check_fills_a_batch`: a dataset with fewer rows than one batch is an error naming the
  file and the batch key; posttrain never silently repeats rows inside one batch.
- `check_context`: a sequence longer than the model's context window (its
  ``max_position_embeddings``) is an error naming the row and the key that let it through;
  position embeddings past the window would train on garbage without any other failure.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError, DataError


def check_fills_a_batch(n_rows: int, batch: int, batch_key: str, source: str) -> None:
    """DataError when `source` has fewer usable rows than one batch of `batch`."""
    if n_rows < batch:
        raise DataError(
            f"{source}: {n_rows} usable row(s), fewer than one batch ({batch_key}={batch}); "
            f"add rows or lower {batch_key} (rows are never repeated inside a batch)"
        )


def model_context(model: Any) -> int | None:
    """The context window in tokens of a built model, or of a model source not built yet (a
    preset name or a local directory with a config.json); None when it does not say."""
    if isinstance(model, str):
        return _source_context(model)
    for m in (model, getattr(model, "backbone", None), getattr(model, "base_model", None)):
        n = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _source_context(source: str) -> int | None:
    import json
    from pathlib import Path

    from posttrain.engines.models import PRESETS

    if source in PRESETS:
        return PRESETS[source].max_position_embeddings
    try:
        n = json.loads((Path(source) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def check_context(model: Any, lengths: list[tuple[str, int]], key: str) -> None:
    """ConfigError when any (where, tokens) in `lengths` exceeds the model's context.

    model: a built model, or its source (preset name or local directory) before it is built.
    key: the setting that let the sequence through (named in the message).
    """
    limit = model_context(model)
    if limit is None or not lengths:
        return
    where, n = max(lengths, key=lambda x: x[1])
    if n > limit:
        raise ConfigError(
            f"{where}: {n} tokens exceed the model's context window of {limit} "
            f"(max_position_embeddings); lower {key} so that no sequence passes the window"
        )


def offline_tokens(item: dict) -> int:
    """Tokens of the longest sequence an offline item is trained on."""
    n = len(item.get("prompt", ()))
    if "chosen" in item:
        return n + max(len(item["chosen"]), len(item["rejected"]))
    if "steps" in item:
        return n + sum(len(s) + 1 for s in item["steps"])  # + a separator per step
    return n + len(item.get("completion", ()))


# Rewards that read a dataset column, with the option naming it and its default.
_REWARD_COLUMNS = {"task": ("answer_column", "answer"), "accuracy": ("answer_column", "answer"),
                   "code": ("tests_column", "tests"), "step_credit": ("solution_column", "solution")}  # fmt: skip


def check_reward_columns(rewards: list[Any], items: list[Any], source: str) -> None:
    """ConfigError when a configured reward reads a column that no prompt row has.

    rewards: the `rewards` config entries (name, options); items: PromptItems (`.columns`).
    Without this every sample of the first step would be a reward error.
    """
    for i, spec in enumerate(rewards):
        if spec.name not in _REWARD_COLUMNS:
            continue
        option, default = _REWARD_COLUMNS[spec.name]
        column = spec.options.get(option, default)
        if not any(it.columns.get(column) not in (None, "") for it in items):
            raise ConfigError(
                f"rewards[{i}] ({spec.name!r}) reads the column {column!r}, which no row of {source} has; "
                f"add it to the data or set rewards[{i}].options.{option}"
            )
