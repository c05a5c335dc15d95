"""Load and validate dataset files in the formats post-training users know.

Files: JSONL (``.jsonl``; ``.json`` holding a JSON array or JSON lines), CSV (``.csv``),
Parquet (``.parquet``), and a directory written by Hugging Face ``datasets``'
``save_to_disk`` (a Dataset or a DatasetDict; pick the split with `split`).

Kinds and their columns (TRL's names; `*_column` arguments map other names onto them):

- "prompt": ``prompt`` — RL prompts; reward functions usually also need ``answer``.
- "completion": ``prompt``, ``completion`` — SFT.
- "messages": ``messages`` = [{role, content}, …] with at least one assistant turn — SFT.
- "preference": ``prompt``, ``chosen``, ``rejected`` — RM / DPO; chosen must differ.
- "stepwise": ``prompt``, ``completions`` (list of step strings), ``labels`` (one bool per
  step) — PRM.

``prompt``, ``completion``, ``chosen`` and ``rejected`` may each be conversational: a list
of {role, content} messages instead of a string (prompt, chosen and rejected together).
Extra columns are kept in each row (reward functions get them as keyword arguments); an
``answer`` given as a JSON number becomes a string, since verifiers compare text.

Rows are validated before training; every problem is one line naming file and row:
``DataError("data/train.jsonl row 7: column 'chosen' is missing")``. Rows are numbered
from 1: for JSON lines the row number is the line number (blank lines count), for the
other formats it is the record's position. Prompts are never truncated: prompts that are
too long are reported by `check_prompt_lengths` and either stop the run or are skipped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("prompt", "completion", "messages", "preference", "stepwise")
ROLES = ("system", "user", "assistant", "tool")
_FIELDS = ("prompt", "completion", "messages", "chosen", "rejected", "completions", "labels")
# Columns that hold lists; CSV cells for them must be JSON.
_LIST_COLUMNS = ("messages", "completions", "labels")
# Columns that are text or a JSON-encoded message list in CSV.
_MAYBE_MESSAGES = ("prompt", "completion", "chosen", "rejected")


def load_rows(
    path: str | Path,
    kind: str,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    completions_column: str = "completions",
    labels_column: str = "labels",
    split: str | None = None,
    require: Sequence[str] = (),
    limit: int | None = None,
) -> list[dict]:
    """Read a dataset file of the given `kind`, validate every row, return row dicts.

    path: a .jsonl/.json/.csv/.parquet file or a `save_to_disk` directory.
    kind: one of KINDS (see the module docstring for the columns each needs).
    *_column: the file's name for each standard column; rows come back with the
        standard names ("prompt", "chosen", …) and all other columns unchanged.
    split: for a saved DatasetDict, which split (default "train" if present).
    require: extra columns every row must have (non-null), e.g. ("answer",) for RL.
    limit: keep only the first `limit` rows (after validation of those rows).
    Returns a list of dicts, one per row. Raises DataError (one line, file and row).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; valid: {', '.join(KINDS)}")
    path = Path(path)
    numbered = read_records(path, split=split)
    if limit is not None:
        numbered = numbered[:limit]
    if not numbered:
        raise DataError(f"{path}: no rows")
    mapping = {
        prompt_column: "prompt",
        completion_column: "completion",
        messages_column: "messages",
        chosen_column: "chosen",
        rejected_column: "rejected",
        completions_column: "completions",
        labels_column: "labels",
    }
    renames = {src: dst for src, dst in mapping.items() if src != dst}
    renamed = []
    for number, record in numbered:
        for src, dst in renames.items():
            if src in record and dst in record:
                raise DataError(f"{path} row {number}: column {src!r} maps to {dst!r}, which also exists")
        renamed.append({renames.get(key, key): value for key, value in record.items()})
    return validate_rows(
        renamed,
        kind,
        source=str(path),
        row_numbers=[n for n, _ in numbered],
        require=require,
        from_csv=path.suffix.lower() == ".csv",
    )


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def read_records(path: Path, *, split: str | None = None) -> list[tuple[int, dict]]:
    """(row number, raw record) pairs from any supported file; no validation of columns."""
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        raw = path.read_bytes()
        if raw.lstrip()[:1] == b"[":
            return _read_json_array(path, raw)
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json, .csv, .parquet or a save_to_disk directory"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} row {number}: invalid UTF-8 at byte {e.start} of the line") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} row {number}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _read_json_array(path: Path, raw: bytes) -> list[tuple[int, dict]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: invalid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    records = []
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        # Line 1 is the header, so line L holds data row L-1 unless a quoted cell spans lines.
        raise DataError(f"{path} line {line}: invalid UTF-8 (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty CSV file (no header)") from None
    except csv.Error as e:
        raise DataError(f"{path} header: malformed CSV ({_one_line(e)})") from None
    records = []
    number = 0
    try:
        for cells in reader:
            if not cells:
                continue
            number += 1
            if len(cells) > len(header):
                raise DataError(f"{path} row {number}: {len(cells)} fields but the header has {len(header)}")
            # A short row leaves trailing columns missing (reported by validation).
            records.append((number, dict(zip(header, cells))))
    except csv.Error as e:
        raise DataError(f"{path} row {number + 1}: malformed CSV ({_one_line(e)})") from None
    return records


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet ({_one_line(e)})") from None
    return _table_records(path, table)


def _table_records(path: Path, table) -> list[tuple[int, dict]]:
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:
        # Locate the offending row; only on the error path, so the slow scan is fine.
        for i in range(table.num_rows):
            try:
                table.slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
                raise DataError(f"{path} row {i + 1}: invalid UTF-8 at byte {e.start}") from None
        raise
    return list(enumerate(rows, start=1))


def _read_saved_dataset(path: Path, split: str | None) -> list[tuple[int, dict]]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise DataError(f"{path}: a directory, but not a dataset saved with datasets' save_to_disk")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load saved dataset ({_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        chosen = split or ("train" if "train" in ds else None)
        if chosen not in ds:
            raise DataError(f"{path}: choose a split with split=...; available: {', '.join(names)}")
        ds = ds[chosen]
    elif split is not None and split != "train":
        raise DataError(f"{path}: a single Dataset has no split {split!r}")
    return list(enumerate(ds.to_list(), start=1))


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def validate_rows(
    rows: Iterable[dict],
    kind: str,
    *,
    source: str = "rows",
    row_numbers: Sequence[int] | None = None,
    require: Sequence[str] = (),
    from_csv: bool = False,
) -> list[dict]:
    """Check rows of `kind` and return normalized copies (labels as bools, answers as text).

    source / row_numbers: how errors name the rows ("data.jsonl row 7"); default numbering
        is the position from 1.
    from_csv: CSV cells are strings, so list columns are decoded from JSON and text
        columns holding a JSON message list become conversational.
    Raises DataError on the first bad row.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; valid: {', '.join(KINDS)}")
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {row_numbers[i] if row_numbers is not None else i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a mapping of columns, got {type(row).__name__}")
        row = dict(row)
        if from_csv:
            _decode_csv_cells(row, where)
        _VALIDATORS[kind](row, where)
        for column in require:
            if row.get(column) is None:
                raise DataError(f"{where}: column {column!r} is missing")
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            row["answer"] = str(answer)
        out.append(row)
    return out


def _decode_csv_cells(row: dict, where: str) -> None:
    for column in _LIST_COLUMNS:
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            try:
                row[column] = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: column {column!r} is not valid JSON ({e.msg})") from None
    for column in _MAYBE_MESSAGES:
        value = row.get(column)
        if isinstance(value, str) and value.lstrip().startswith("[{"):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                continue  # plain text that happens to start with "[{"
            if isinstance(decoded, list) and all(isinstance(m, dict) and "role" in m for m in decoded):
                row[column] = decoded


def _present(row: dict, column: str, where: str):
    if column not in row:
        raise DataError(f"{where}: column {column!r} is missing")
    if row[column] is None:
        raise DataError(f"{where}: column {column!r} is null")
    return row[column]


def _text(row: dict, column: str, where: str) -> str:
    value = _present(row, column, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty")
    return value


def _messages(value, column: str, where: str, *, need_assistant: bool = False) -> list:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r} must be a non-empty list of {{role, content}} messages")
    for j, message in enumerate(value):
        at = f"{where}: {column}[{j}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be a {{role, content}} object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at} content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at} is an empty assistant message")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: column {column!r} has no assistant message to train on")
    return value


def _text_or_messages(row: dict, column: str, where: str) -> str | list:
    value = _present(row, column, where)
    if isinstance(value, list):
        return _messages(value, column, where)
    return _text(row, column, where)


def _check_prompt(row: dict, where: str) -> None:
    _text_or_messages(row, "prompt", where)


def _check_completion(row: dict, where: str) -> None:
    _check_prompt(row, where)
    _text_or_messages(row, "completion", where)


def _check_messages(row: dict, where: str) -> None:
    _messages(_present(row, "messages", where), "messages", where, need_assistant=True)


def _check_preference(row: dict, where: str) -> None:
    _check_prompt(row, where)
    chosen = _text_or_messages(row, "chosen", where)
    rejected = _text_or_messages(row, "rejected", where)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' is identical to 'rejected'")


def _check_stepwise(row: dict, where: str) -> None:
    _check_prompt(row, where)
    steps = _present(row, "completions", where)
    if not isinstance(steps, list) or not steps:
        raise DataError(f"{where}: column 'completions' must be a non-empty list of step strings")
    for j, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataError(f"{where}: completions[{j}] must be a non-empty string")
    labels = _present(row, "labels", where)
    if not isinstance(labels, list):
        raise DataError(f"{where}: column 'labels' must be a list of booleans, got {type(labels).__name__}")
    if len(labels) != len(steps):
        raise DataError(
            f"{where}: 'labels' has {len(labels)} entries but 'completions' has {len(steps)} steps"
        )
    clean = []
    for j, label in enumerate(labels):
        # 0/1 integers are common in exported PRM data; anything else is ambiguous.
        if isinstance(label, bool) or label in (0, 1) and isinstance(label, int):
            clean.append(bool(label))
        else:
            raise DataError(f"{where}: labels[{j}] must be true/false, got {label!r}")
    row["labels"] = clean


_VALIDATORS: dict[str, Callable[[dict, str], None]] = {
    "prompt": _check_prompt,
    "completion": _check_completion,
    "messages": _check_messages,
    "preference": _check_preference,
    "stepwise": _check_stepwise,
}


# --------------------------------------------------------------------------------------
# Prompt lengths
# --------------------------------------------------------------------------------------
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
        chat template with the generation prompt.
    tokenizer: a Hugging Face tokenizer (a text prompt counts its BOS, as
        `posttrain.engines.encoding.encode_text` tokenizes it) or a plain callable
        text -> token ids.
    """
    prompt = render(row) if render is not None else _prompt_of(row)
    if isinstance(prompt, list):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ConfigError(
                "a conversational prompt needs a tokenizer with a chat template, or a render function"
            )
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
    if hasattr(tokenizer, "encode"):
        from posttrain.engines.encoding import encode_text  # the BOS convention the trainers use

        return len(encode_text(tokenizer, prompt))
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
