"""Prompt lengths of dataset rows as the model sees them; too-long prompts stop the run or
are skipped, never truncated (re-exported by `posttrain.data.datasets`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from posttrain.errors import ConfigError, DataError

log = logging.getLogger("posttrain.data.datasets")


def _prompt_of(row: dict):
    if "prompt" in row:
        return row["prompt"]
    messages = row.get("messages") or []
    # A conversation's prompt is everything before its last assistant turn.
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def count_prompt_tokens(row: dict, tokenizer, render: Callable[[dict], str] | None = None) -> int:
    """Tokens in a row's prompt as the model will see it.

    render: row -> the exact prompt text fed to the model (e.g. with the chat template
        applied); default: a text prompt as is, a message list through the tokenizer's
        chat template with the generation prompt (`posttrain.engines.encoding.encode_prompt`).
    tokenizer: a Hugging Face tokenizer (a text prompt counts its BOS, as
        `posttrain.engines.encoding.encode_text` tokenizes it) or a plain callable
        text -> token ids.
    """
    from posttrain.engines.encoding import encode_prompt, encode_text, has_chat_template

    prompt = render(row) if render is not None else _prompt_of(row)
    if isinstance(prompt, list) and has_chat_template(tokenizer):
        return len(encode_prompt(tokenizer, prompt))  # the ids the trainers feed the model
    if isinstance(prompt, list):  # a tokenizer-like object with its own template method
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ConfigError(
                "a conversational prompt needs a tokenizer with a chat template, or a render function"
            )
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
    if hasattr(tokenizer, "encode"):
        return len(encode_text(tokenizer, prompt))  # the BOS convention the trainers use
    return len(tokenizer(prompt))


def check_prompt_lengths(
    rows: Sequence[dict],
    tokenizer,
    max_prompt_tokens: int,
    policy: str = "error",
    *,
    source: str = "dataset",
    render: Callable[[dict], str] | None = None,
) -> list[dict]:
    """Rows whose prompt fits in `max_prompt_tokens` tokens; never truncates a prompt.

    policy: "error" raises DataError naming the first row that is too long and how many
        are; "skip" drops them and logs a warning with the count and the first row numbers.
    render / tokenizer: see `count_prompt_tokens`.
    """
    if policy not in ("error", "skip"):
        raise ConfigError(f"prompt length policy must be 'error' or 'skip', got {policy!r}")
    if max_prompt_tokens <= 0:
        raise ConfigError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
    kept, too_long = [], []
    for i, row in enumerate(rows):
        n = count_prompt_tokens(row, tokenizer, render)
        if n > max_prompt_tokens:
            too_long.append((i + 1, n))
        else:
            kept.append(row)
    if too_long and policy == "error":
        number, n = too_long[0]
        raise DataError(
            f"{source} row {number}: prompt has {n} tokens, more than max_prompt_tokens={max_prompt_tokens} "
            f"({len(too_long)} of {len(rows)} rows too long; use the 'skip' policy to drop them)"
        )
    if too_long:
        shown = ", ".join(str(num) for num, _ in too_long[:5])
        log.warning(
            "%s: skipped %d of %d rows whose prompt exceeds %d tokens (rows %s%s)",
            source,
            len(too_long),
            len(rows),
            max_prompt_tokens,
            shown,
            ", ..." if len(too_long) > 5 else "",
        )
    return kept
