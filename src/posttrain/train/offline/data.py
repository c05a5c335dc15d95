"""Rows -> token ids for the offline trainers (SFT, RM, PRM, preference).

Rows come from a dataset file (`posttrain.data.datasets.load_rows`) or from a synthetic
task (`posttrain.data.tasks.task_rows`) in the same row format, so the trainers never
care where the data came from. This module renders prompts with the tokenizer's chat
template (thinking mode on, or off for the no-think share of an SFT mix), appends EOS to
completions so the model learns to stop, and validates what the trainers rely on with
one-line DataErrors naming the source and row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from posttrain.algos.sft import strip_thinking
from posttrain.engines.encoding import encode_continuation, encode_prompt
from posttrain.errors import ConfigError, DataError

# Row kinds of data/datasets.load_rows and data/tasks.task_rows used by each trainer.
KIND = {"sft": "completion", "rm": "preference", "prm": "stepwise", "dpo": "preference"}


@dataclass
class Split:
    """Training and held-out rows plus where they came from (for error messages)."""

    train: list[dict]
    eval: list[dict]
    source: str
    task: object | None = None  # a data.tasks Task when accuracy can be measured
    eval_examples: list = field(default_factory=list)  # task Examples for accuracy
    filtered: dict | None = None  # data.keep_if counts {"column", "kept", "dropped"}


def load_split(
    data, kind: str, *, messages: bool = False, score_column: str = "score", transform=None
) -> Split:
    """Load train / held-out rows for one trainer from `data` (an offline DataSection).

    Precedence: data.path (file; held-out = data.eval_path, else the last
    data.eval_fraction of the shuffled rows) over data.task (synthetic; train / test
    splits of the task, disjoint by construction). With a file, data.task (if set) is
    still used for held-out task accuracy. score_column: the file's score column for the
    "scored" kind. transform: (rows, source) -> rows, applied to a file's rows after
    data.keep_if and before the hold-out split (long-to-short: shortest per prompt,
    long-vs-short pairs), so rows of one prompt are grouped before they are split.
    """
    task = None
    eval_examples: list = []
    keep_if = getattr(data, "keep_if", None)
    if keep_if and not data.path:
        raise ConfigError(
            f"data.keep_if={keep_if!r} filters the rows of a data.path file; synthetic task rows have no such column"
        )
    if data.task:
        from posttrain.data.tasks import get_task

        task = get_task(data.task, **dict(getattr(data, "task_options", None) or {}))
        eval_examples = task.examples("test", data.n_eval, seed=data.seed, difficulty=data.difficulty)
    if data.path:
        from posttrain.data.datasets import load_rows

        file_kind = "messages" if messages else kind
        columns = dict(prompt_column=data.prompt_column, score_column=score_column)
        rows = load_rows(data.path, file_kind, **columns)
        filtered = None
        if keep_if:
            rows, filtered = keep_rows(rows, keep_if, str(data.path))
        if transform is not None:
            rows = transform(rows, str(data.path))
        if data.eval_path:
            eval_rows = load_rows(data.eval_path, file_kind, **columns)
            if keep_if:
                eval_rows, eval_filtered = keep_rows(eval_rows, keep_if, str(data.eval_path))
                filtered = {
                    **filtered,
                    "eval_kept": eval_filtered["kept"],
                    "eval_dropped": eval_filtered["dropped"],
                }
            if transform is not None:
                eval_rows = transform(eval_rows, str(data.eval_path))
            train_rows = rows
        else:
            if not 0.0 <= data.eval_fraction < 1.0:
                raise ConfigError(f"data.eval_fraction must be in [0, 1), got {data.eval_fraction}")
            order = sorted(range(len(rows)), key=lambda i: _hash(f"{data.seed}:{i}"))
            n_eval = int(round(len(rows) * data.eval_fraction))
            eval_rows = [rows[i] for i in sorted(order[:n_eval])]
            train_rows = [rows[i] for i in sorted(order[n_eval:])]
        if not train_rows:
            raise DataError(f"{data.path}: no training rows" + (f" with {keep_if} = true" if keep_if else ""))
        return Split(train_rows, eval_rows, str(data.path), task, eval_examples, filtered)
    if task is None:
        raise ConfigError("set data.path (a dataset file) or data.task (a synthetic task name)")
    from posttrain.data.tasks import task_rows

    train_rows = task_rows(task, "train", data.n_train, seed=data.seed, kind=kind, difficulty=data.difficulty)
    eval_rows = task_rows(task, "test", data.n_eval, seed=data.seed, kind=kind, difficulty=data.difficulty)
    return Split(train_rows, eval_rows, f"task {data.task}", task, eval_examples)


def keep_rows(rows: list[dict], column: str, source: str) -> tuple[list[dict], dict]:
    """The rows whose boolean `column` is true, and counts {"column", "kept", "dropped"}.

    Rejection sampling for SFT (DeepSeek-R1 stage 3; RFT, Yuan et al. 2023): keep only the
    samples a verifier marked correct, e.g. the `correct` column `posttrain eval` writes
    to samples.jsonl. A row without the column, or with a value that is not a boolean
    (true/false, or 0/1), is a one-line DataError naming the row: a silent "missing means
    drop" would hide a misspelt column name. The kept/dropped counts are also written to
    stderr so the user sees what the filter did before training starts.
    """
    import sys

    kept = []
    for i, row in enumerate(rows):
        if column not in row:
            present = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{source} row {i + 1}: no column {column!r} for data.keep_if (columns: {present})"
            )
        value = row[column]
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise DataError(
                f"{source} row {i + 1}: data.keep_if column {column!r} must be a boolean, got {value!r}"
            )
        if value:
            kept.append(row)
    counts = {"column": column, "kept": len(kept), "dropped": len(rows) - len(kept)}
    sys.stderr.write(f"data.keep_if={column}: kept {len(kept)} of {len(rows)} rows of {source}\n")
    return kept, counts


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _text(value, where: str, column: str) -> str:
    """A completion given as a string or as assistant message(s) -> the string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return "".join(str(m.get("content", "")) for m in value if m.get("role", "assistant") == "assistant")
    raise DataError(
        f"{where}: column {column!r} must be a string or a list of messages, got {type(value).__name__}"
    )


def _prompt_ids(tokenizer, prompt, where: str, data, *, enable_thinking: bool = True) -> list[int] | None:
    """The prompt's ids (`encode_prompt`), or None for a prompt over data.max_prompt_tokens
    with data.too_long=skip (an error with data.too_long=error)."""
    if (
        prompt is None
        or (isinstance(prompt, str) and not prompt.strip())
        or (isinstance(prompt, list) and not prompt)
    ):
        raise DataError(f"{where}: empty prompt")
    ids = encode_prompt(tokenizer, prompt, enable_thinking=enable_thinking)
    limit = data.max_prompt_tokens
    if limit and len(ids) > limit:
        if data.too_long == "error":
            raise DataError(
                f"{where}: prompt has {len(ids)} tokens (chat template applied) > data.max_prompt_tokens={limit}; "
                "raise the limit or set data.too_long=skip"
            )
        return None
    return ids


def encode_rows(rows: list[dict], tokenizer, data, source: str, read_row) -> list[dict]:
    """The loop every row format shares, in one place.

    `read_row(i, row, where)` checks row i (a one-line DataError naming `where`) and returns
    (prompt, enable_thinking, build). The prompt is encoded next (`_prompt_ids`: a prompt
    over data.max_prompt_tokens is skipped or refused, per data.too_long); for a kept row,
    `build()` gives its items without the prompt ids, a list since a ranked row gives
    several. Each item is {"prompt": ids, **fields}. No usable row at all is an error.
    """
    items = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        prompt, think, build = read_row(i, row, where)
        p = _prompt_ids(tokenizer, prompt, where, data, enable_thinking=think)
        if p is not None:
            items += [{"prompt": p, **fields} for fields in build()]
    if not items:
        raise DataError(f"{source}: no usable rows")
    return items


def encode_sft(rows: list[dict], tokenizer, data, source: str) -> list[dict]:
    """SFT items {"prompt": ids, "completion": ids + [eos], "think": bool}.

    A row is either prompt/completion or conversational `messages` (the last assistant
    message is the completion, everything before it the prompt). A deterministic
    data.no_think_fraction of rows is rendered in no-think mode (the template pre-fills an
    empty <think></think>) with the reasoning block stripped from the completion: the
    Qwen3 thinking-mode-fusion mix in one run.
    """
    eos = tokenizer.eos_token_id

    def read_row(i, row, where):
        if "messages" in row and "completion" not in row:
            msgs = row["messages"]
            last = max((j for j, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise DataError(f"{where}: no assistant message to train on")
            prompt, completion = msgs[:last], str(msgs[last].get("content", ""))
        else:
            prompt, completion = row.get("prompt"), _text(row.get("completion"), where, "completion")
        think = _hash(f"think:{data.seed}:{i}") / 2**64 >= data.no_think_fraction
        if not think:
            completion = strip_thinking(completion)
        if not completion.strip():
            raise DataError(f"{where}: empty completion")
        return (
            prompt,
            think,
            lambda: [{"completion": encode_continuation(tokenizer, completion) + [eos], "think": think}],
        )

    return encode_rows(rows, tokenizer, data, source, read_row)


def encode_pairs(
    rows: list[dict],
    tokenizer,
    data,
    source: str,
    *,
    margin_column: str | None = None,
    append_eos: bool = True,
) -> list[dict]:
    """Preference items {"prompt", "chosen", "rejected" (token ids), "margin"}.

    append_eos: end completions with EOS (policies: the stop decision is part of the
    preferred behaviour). Reward models use False: the "reward_model" reward scores
    prompt + completion text as generated, without an EOS, at its last token.

    Errors (one line, with the row): missing/empty chosen or rejected, chosen == rejected
    (a pair that carries no preference), missing margin when a margin column is asked for.
    """
    tail = [tokenizer.eos_token_id] if append_eos else []

    def read_row(i, row, where):
        for col in ("chosen", "rejected"):
            if col not in row or row[col] is None:
                raise DataError(f"{where}: column {col!r} is missing")
        chosen, rejected = _text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")
        if not chosen.strip() or not rejected.strip():
            raise DataError(f"{where}: empty {'chosen' if not chosen.strip() else 'rejected'} completion")
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are identical")
        margin = 0.0
        if margin_column:
            if row.get(margin_column) is None:
                raise DataError(f"{where}: margin column {margin_column!r} is missing")
            margin = float(row[margin_column])
        return (
            row.get("prompt"),
            True,
            lambda: [
                {
                    "chosen": encode_continuation(tokenizer, chosen) + tail,
                    "rejected": encode_continuation(tokenizer, rejected) + tail,
                    "margin": margin,
                }
            ],
        )

    return encode_rows(rows, tokenizer, data, source, read_row)


def encode_steps(rows: list[dict], tokenizer, data, source: str) -> list[dict]:
    """Stepwise items {"prompt": ids, "steps": [ids per step], "labels": [bool per step]}.

    Accepts TRL-style `completions` / `labels` and the synthetic tasks' `steps` /
    `step_labels`. Errors: no steps, an empty step, a label count that does not match
    the step count, a non-boolean label.
    """

    def read_row(i, row, where):
        steps = row.get("completions", row.get("steps"))
        labels = row.get("labels", row.get("step_labels"))
        if not isinstance(steps, list) or not steps:
            raise DataError(f"{where}: column 'completions' must be a non-empty list of step strings")
        if not isinstance(labels, list) or len(labels) != len(steps):
            n = len(labels) if isinstance(labels, list) else "no"
            raise DataError(
                f"{where}: {len(steps)} steps but {n} labels; stepwise labels must match steps one to one"
            )
        if any(not isinstance(s, str) or not s.strip() for s in steps):
            raise DataError(f"{where}: empty step in 'completions'")
        if any(not isinstance(x, (bool, int)) or x not in (0, 1) for x in labels):
            raise DataError(f"{where}: 'labels' must be booleans")
        return (
            row.get("prompt"),
            True,
            lambda: [
                {
                    "steps": [encode_continuation(tokenizer, s) for s in steps],
                    "labels": [bool(x) for x in labels],
                }
            ],
        )

    return encode_rows(rows, tokenizer, data, source, read_row)


def until_first_error(items: list[dict]) -> list[dict]:
    """Stepwise items cut after their first wrong step (all-correct traces unchanged).

    PRM800K (Lightman et al. 2023) labels a solution only up to its first wrong step: the
    PRM learns whether a step is right given a correct prefix, and never has to carry
    "something earlier was wrong" through steps that are locally fine. On the column
    traces that is what lets a 2-layer PRM find the first wrong step (docs/benchmarks.md).
    """
    out = []
    for it in items:
        if all(it["labels"]):
            out.append(it)
            continue
        k = it["labels"].index(False) + 1
        out.append({**it, "steps": it["steps"][:k], "labels": it["labels"][:k]})
    return out


# --------------------------------------------------------------------------- self-generated pairs


def pair_by_outcome(texts: list[str], correct: list[bool], max_pairs: int) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs from one prompt's k samples and their verifier outcomes.

    texts: k completions of ONE prompt; correct: k outcomes. Distinct correct texts are
    paired with distinct incorrect texts in sample order, at most `max_pairs` pairs, every
    sample used once before any is reused, and never the same pair twice —
    rejection-sampling pairs as in RS-DPO (Khaki et al. 2024) and the on-policy pairs of
    iterative RPO (Pang et al. 2024, which pairs random correct/incorrect samples).
    A prompt whose samples are all correct or all wrong gives no pair ([]).
    """
    good = list(dict.fromkeys(t for t, c in zip(texts, correct) if c))
    bad = list(dict.fromkeys(t for t, c in zip(texts, correct) if not c))
    if not good or not bad:
        return []
    # Diagonals of the good x bad grid: diagonal d pairs good[i] with bad[(i + d) % L], so
    # the first pairs use every correct and every incorrect sample before reusing one, and
    # no (good, bad) cell is visited twice.
    cells = [(i, (i + d) % len(bad)) for d in range(len(bad)) for i in range(len(good))]
    return [(good[i], bad[j]) for i, j in cells[:max_pairs]]


def self_generated_pairs(
    model,
    tokenizer,
    task,
    examples: list,
    *,
    samples_per_prompt: int,
    pairs_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    keep_truncated: bool = False,
    batch_size: int = 32,
) -> tuple[list[dict], dict[str, int]]:
    """Preference rows sampled from `model` itself and labelled by the task verifier.

    examples: P task Examples (prompt, answer). Each prompt gets `samples_per_prompt`
    samples at `temperature` from the native engine (chat template, thinking mode on, as
    the policy is trained and evaluated); `task.score(text, answer) == 1` marks a sample
    correct. Samples cut by `max_new_tokens` are dropped unless `keep_truncated`
    (encode_pairs appends EOS, which makes them a completion the model never finished).
    `pair_by_outcome` forms the pairs.

    Returns (rows {"prompt", "chosen", "rejected", "answer"}, counts {"prompts",
    "samples", "truncated", "dropped" (truncated or blank, not used), "correct",
    "mixed_prompts", "all_correct_prompts", "all_wrong_prompts", "pairs"}).
    """
    from posttrain.train.evaluate import generate_samples

    if samples_per_prompt < 2 or pairs_per_prompt < 1 or temperature <= 0:
        raise ConfigError(
            f"self-generated pairs need samples_per_prompt >= 2, pairs_per_prompt >= 1 and temperature > 0, "
            f"got {samples_per_prompt}, {pairs_per_prompt}, {temperature}"
        )
    prompts = [ex.prompt for ex in examples]
    texts, _, reasons = generate_samples(
        model, tokenizer, prompts, k=samples_per_prompt, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    counts = dict.fromkeys(
        ("prompts", "samples", "truncated", "dropped", "correct", "mixed_prompts", "all_correct_prompts",
         "all_wrong_prompts", "pairs"), 0,
    )  # fmt: skip
    rows = []
    for ex, ts, rs in zip(examples, texts, reasons):
        # A blank sample (EOS first) cannot be a preference row (encode_pairs rejects empty
        # completions): dropped and counted.
        kept = [t for t, r in zip(ts, rs) if (keep_truncated or r != "length") and t.strip()]
        correct = [task.score(t, str(ex.answer)) >= 1.0 for t in kept]
        counts["prompts"] += 1
        counts["samples"] += len(ts)
        counts["truncated"] += sum(r == "length" for r in rs)
        counts["dropped"] += len(ts) - len(kept)
        counts["correct"] += sum(correct)
        if kept and all(correct):
            counts["all_correct_prompts"] += 1
        elif not any(correct):
            counts["all_wrong_prompts"] += 1
        else:
            counts["mixed_prompts"] += 1
        for chosen, rejected in pair_by_outcome(kept, correct, pairs_per_prompt):
            rows.append({"prompt": ex.prompt, "chosen": chosen, "rejected": rejected, "answer": ex.answer})
    counts["pairs"] = len(rows)
    return rows, counts
