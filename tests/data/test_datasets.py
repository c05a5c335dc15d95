"""Dataset loading: every file format and kind, and every one-line validation error."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from posttrain.data.datasets import check_prompt_lengths, count_prompt_tokens, load_rows, validate_rows
from posttrain.errors import ConfigError, DataError

ROWS = {
    "prompt": [
        {"prompt": "What is 2+2?", "answer": "4", "source": "a"},
        {"prompt": "Hi?", "answer": "x", "source": "b"},
    ],
    "completion": [
        {"prompt": "P1", "completion": "C1", "meta": 1},
        {"prompt": "P2", "completion": "C2", "meta": 2},
    ],
    "messages": [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "lang": "en",
        },
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ],
            "lang": "en",
        },
    ],
    "preference": [
        {"prompt": "P", "chosen": "good", "rejected": "bad", "margin": 1.5},
        {
            "prompt": [{"role": "user", "content": "P"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
            "margin": 0.5,
        },
    ],
    "stepwise": [
        {"prompt": "P", "completions": ["s1", "s2"], "labels": [True, False], "k": "a"},
        {"prompt": "Q", "completions": ["t1"], "labels": [True], "k": "b"},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("kind", list(ROWS))
def test_every_format_and_kind_round_trips(tmp_path, fmt, kind):
    rows = ROWS[kind]
    if fmt == "parquet" and kind == "preference":
        rows = rows[:1]  # Arrow needs one type per column; conversational pairs tested below
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", rows)
    got = load_rows(path, kind)
    expected = [dict(r) for r in rows]
    if fmt == "csv":  # CSV keeps extra columns as text
        for r in expected:
            for k, v in r.items():
                if k not in (
                    "prompt",
                    "completion",
                    "messages",
                    "chosen",
                    "rejected",
                    "completions",
                    "labels",
                ):
                    r[k] = str(v)
    assert got == expected


def test_saved_dataset_directory_and_splits(tmp_path):
    import datasets

    write_saved(tmp_path / "ds", ROWS["stepwise"])
    assert load_rows(tmp_path / "ds", "stepwise") == ROWS["stepwise"]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS["prompt"]),
            "test": datasets.Dataset.from_list(ROWS["prompt"][:1]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_rows(tmp_path / "dd", "prompt")) == 2
    assert len(load_rows(tmp_path / "dd", "prompt", split="test")) == 1
    with pytest.raises(DataError, match="available: train, test"):
        load_rows(tmp_path / "dd", "prompt", split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with"):
        load_rows(tmp_path / "plain", "prompt")


def test_conversational_preference_parquet_and_column_mapping(tmp_path):
    rows = [ROWS["preference"][1]]
    assert load_rows(write_parquet(tmp_path / "c.parquet", rows), "preference") == rows
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "good": "a", "bad": "b"}])
    got = load_rows(path, "preference", prompt_column="question", chosen_column="good", rejected_column="bad")
    assert got == [{"prompt": "Q?", "chosen": "a", "rejected": "b"}]
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"question": "Q?", "prompt": "P"}])
    with pytest.raises(DataError, match="row 1: column 'question' maps to 'prompt', which also exists"):
        load_rows(clash, "prompt", prompt_column="question")


def test_json_array_answers_become_text_and_limit(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"prompt": "1+1?", "answer": 2}, {"prompt": "2+2?", "answer": 4.5}]))
    rows = load_rows(path, "prompt", require=("answer",))
    assert [r["answer"] for r in rows] == ["2", "4.5"]
    assert len(load_rows(path, "prompt", limit=1)) == 1


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("kind", "bad_row", "expected"),
    [
        ("preference", {"prompt": "p", "rejected": "r"}, "row 3: column 'chosen' is missing"),
        ("prompt", {"prompt": "   "}, "row 3: column 'prompt' is empty"),
        ("prompt", {"prompt": 7}, "row 3: column 'prompt' must be a string, got int"),
        ("prompt", {"prompt": None}, "row 3: column 'prompt' is null"),
        ("completion", {"prompt": "p", "completion": ""}, "row 3: column 'completion' is empty"),
        (
            "preference",
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            "row 3: 'chosen' is identical to 'rejected'",
        ),
        (
            "preference",
            {"prompt": "p", "chosen": "x", "rejected": [{"role": "assistant", "content": "y"}]},
            "row 3: 'chosen' and 'rejected' must both be text or both be message lists",
        ),
        (
            "stepwise",
            {"prompt": "p", "completions": ["a", "b", "c"], "labels": [True, False]},
            "row 3: 'labels' has 2 entries but 'completions' has 3 steps",
        ),
        (
            "stepwise",
            {"prompt": "p", "completions": ["a"], "labels": ["yes"]},
            "row 3: labels[0] must be true/false",
        ),
        (
            "stepwise",
            {"prompt": "p", "completions": [], "labels": []},
            "row 3: column 'completions' must be a non-empty list",
        ),
        (
            "stepwise",
            {"prompt": "p", "completions": ["a", " "], "labels": [1, 0]},
            "row 3: completions[1] must be a non-empty",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}]},
            "row 3: column 'messages' has no assistant message",
        ),
        (
            "messages",
            {"messages": [{"role": "bot", "content": "hi"}]},
            "row 3: messages[0] has role 'bot'; valid roles",
        ),
        ("messages", {"messages": "hi"}, "row 3: column 'messages' must be a non-empty list"),
        (
            "messages",
            {"messages": [{"role": "user", "content": 3}]},
            "row 3: messages[0] content must be a string",
        ),
    ],
)
def test_row_errors_are_one_line_and_name_file_and_row(tmp_path, kind, bad_row, expected):
    good = ROWS[kind][0]
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad_row])
    with pytest.raises(DataError) as e:
        load_rows(path, kind)
    message = one_line(e)
    assert message.startswith(str(path))
    assert expected in message


def test_jsonl_line_level_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert "t.jsonl row 3: malformed JSON" in one_line(e)  # blank line 2 still counts
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert "t.jsonl row 2: invalid UTF-8" in one_line(e)
    path.write_bytes(b'{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="row 2: expected a JSON object, got list"):
        load_rows(path, "prompt")
    path.write_bytes(b"\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(path, "prompt")


def test_csv_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"prompt,answer\nok,1\ncaf\xe9,2\n")
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert "t.csv line 3: invalid UTF-8" in one_line(e)
    path.write_text("prompt,answer\nok,1\nmore,2,extra\n")
    with pytest.raises(DataError, match="row 2: 3 fields but the header has 2"):
        load_rows(path, "prompt")
    path.write_text('prompt,completions,labels\np,"[""a""]",[true\n')
    with pytest.raises(DataError, match="row 1: column 'labels' is not valid JSON"):
        load_rows(path, "stepwise")
    path.write_text("prompt,chosen\np,a\n")
    with pytest.raises(DataError, match="row 1: column 'rejected' is missing"):
        load_rows(path, "preference")
    # Text that merely looks like a list stays text.
    path.write_text('prompt,completion\np,"[1, 2]"\n')
    assert load_rows(path, "completion")[0]["completion"] == "[1, 2]"


def test_parquet_invalid_utf8_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"fine", b"bad\xff"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": raw}), tmp_path / "u.parquet")
    with pytest.raises(DataError) as e:
        load_rows(tmp_path / "u.parquet", "prompt")
    assert "u.parquet row 2: invalid UTF-8" in one_line(e)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_rows(tmp_path / "data" / "missing.jsonl", "prompt")
    assert one_line(e) == f"{tmp_path / 'data' / 'missing.jsonl'}: no such file or directory"
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(tmp_path / "x.txt", "prompt")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read Parquet"):
        load_rows(tmp_path / "bad.parquet", "prompt")
    with pytest.raises(ConfigError, match="unknown dataset kind 'pairs'"):
        load_rows(tmp_path / "x.txt", "pairs")
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match="row 1: column 'answer' is missing"):
        load_rows(tmp_path / "ok.jsonl", "prompt", require=("answer",))


def test_stepwise_integer_labels_become_bools():
    rows = validate_rows([{"prompt": "p", "completions": ["a", "b"], "labels": [1, 0]}], "stepwise")
    assert rows[0]["labels"] == [True, False]


class CharTokenizer:
    """One token per character; enough to count prompt lengths by hand."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text] + ([0] if add_special_tokens else [])

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )
        return {"input_ids": self.encode(text)}


def test_prompt_lengths_error_and_skip(caplog):
    tok = CharTokenizer()
    rows = [{"prompt": "abc"}, {"prompt": "abcdefgh"}, {"prompt": "ab"}, {"prompt": "x" * 20}]
    assert count_prompt_tokens(rows[1], tok) == 8
    # "<user>hi<assistant>" = 6 + 2 + 11 characters
    assert count_prompt_tokens({"prompt": [{"role": "user", "content": "hi"}]}, tok) == 19
    # A conversation's prompt is everything before the last assistant turn.
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert count_prompt_tokens(conv, tok) == 19
    assert count_prompt_tokens(rows[0], lambda s: list(s.encode())) == 3
    assert check_prompt_lengths(rows, tok, 20) == rows
    with pytest.raises(DataError) as e:
        check_prompt_lengths(rows, tok, 5, source="train.jsonl")
    assert one_line(e).startswith(
        "train.jsonl row 2: prompt has 8 tokens, more than max_prompt_tokens=5 (2 of 4 rows"
    )
    with caplog.at_level(logging.WARNING):
        kept = check_prompt_lengths(rows, tok, 5, policy="skip")
    assert kept == [rows[0], rows[2]]
    assert kept[0]["prompt"] == "abc"  # never truncated
    assert "skipped 2 of 4 rows" in caplog.text and "rows 2, 4" in caplog.text
    assert check_prompt_lengths(rows, tok, 5, policy="skip", render=lambda r: r["prompt"][:1]) == rows
    with pytest.raises(ConfigError, match="policy"):
        check_prompt_lengths(rows, tok, 5, policy="truncate")


def test_prompt_lengths_with_the_char_tokenizer():
    tokenizer_module = pytest.importorskip("posttrain.engines.tokenizer")
    tok = tokenizer_module.build_char_tokenizer()
    text_row = {"prompt": "What is 7+5?"}
    assert count_prompt_tokens(text_row, tok) == len("What is 7+5?")  # one token per character
    conv_row = {"prompt": [{"role": "user", "content": "What is 7+5?"}]}
    rendered = tok.apply_chat_template(conv_row["prompt"], tokenize=False, add_generation_prompt=True)
    assert count_prompt_tokens(conv_row, tok) == len(tok.encode(rendered, add_special_tokens=False))
    assert count_prompt_tokens(conv_row, tok) > count_prompt_tokens(text_row, tok)
    limit = count_prompt_tokens(text_row, tok)
    assert check_prompt_lengths([text_row, conv_row], tok, limit, policy="skip") == [text_row]
