"""Rejection-sampling SFT: `data.keep_if` keeps only the rows a verifier marked correct.

The rows are in the format `posttrain eval` writes to samples.jsonl (prompt, answer,
sample, completion, correct, length, finish), so `eval` -> `sft` needs no other tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import SFTConfig, build_sft, plan, run_sft
from posttrain.train.offline.data import keep_rows


def _sample(i: int, correct) -> dict:
    a, b = i % 7, i % 5
    answer = a + b + (0 if correct else 1)
    return {
        "prompt": f"What is {a}+{b}?",
        "answer": str(a + b),
        "sample": i % 2,
        "completion": f"<think>{a}+{b}={answer}</think><answer>{answer}</answer>",
        "correct": correct,
        "length": 20,
        "finish": "stop",
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, path: Path, *overrides: str):
    return load_config(SFTConfig, None, [
        "--run.output_dir", str(tmp_path / "sft"), "--data.path", str(path), "--data.task", "null",
        "--data.keep_if", "correct", "--data.eval_fraction", "0", "--train.eval_generations", "0",
        "--train.eval_every", "0", *overrides,
    ])  # fmt: skip


def test_keep_rows_counts_and_keeps_order():
    rows = [_sample(i, i % 3 == 0) for i in range(10)]
    kept, counts = keep_rows(rows, "correct", "samples.jsonl")
    assert kept == [rows[i] for i in (0, 3, 6, 9)]
    assert counts == {"column": "correct", "kept": 4, "dropped": 6}
    assert keep_rows([{"ok": 1}, {"ok": 0}], "ok", "f")[1]["kept"] == 1  # 0/1 count as booleans


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "completion": "a"}, "row 2: no column 'correct' for data.keep_if"),
        (
            {"prompt": "q", "completion": "a", "correct": "yes"},
            "row 2: data.keep_if column 'correct' must be a boolean",
        ),
        ({"prompt": "q", "completion": "a", "correct": None}, "must be a boolean, got None"),
    ],
)
def test_keep_rows_rejects_a_missing_or_non_boolean_column(row, message):
    with pytest.raises(DataError, match=message):
        keep_rows([_sample(0, True), row], "correct", "samples.jsonl")


def test_sft_trains_only_on_the_correct_samples(tmp_path, capsys):
    rows = [_sample(i, i % 4 != 0) for i in range(24)]  # 18 correct, 6 wrong
    path = _write(tmp_path / "samples.jsonl", rows)
    cfg = _cfg(
        tmp_path, path, "--train.steps", "1", "--train.batch_size", "4", "--train.micro_batch_size", "4"
    )
    method, _ = build_sft(cfg)
    assert len(method.train_items) == 18
    assert "kept 18 of 24 rows" in capsys.readouterr().err
    assert "rows with correct = true only" in plan(cfg)
    summary = run_sft(cfg)
    assert summary["data_filter"] == {"column": "correct", "kept": 18, "dropped": 6}


def test_held_out_file_is_filtered_too(tmp_path):
    train = _write(tmp_path / "train.jsonl", [_sample(i, i % 2 == 0) for i in range(8)])
    held = _write(tmp_path / "held.jsonl", [_sample(i, i < 3) for i in range(5)])
    method, _ = build_sft(_cfg(tmp_path, train, "--data.eval_path", str(held)))
    assert (len(method.train_items), len(method.eval_items)) == (4, 3)
    assert method.data_filter == {
        "column": "correct",
        "kept": 4,
        "dropped": 4,
        "eval_kept": 3,
        "eval_dropped": 2,
    }


def test_no_correct_row_and_synthetic_data_are_one_line_errors(tmp_path):
    path = _write(tmp_path / "wrong.jsonl", [_sample(i, False) for i in range(4)])
    with pytest.raises(DataError, match="no training rows with correct = true"):
        build_sft(_cfg(tmp_path, path))
    cfg = load_config(SFTConfig, None, ["--data.keep_if", "correct", "--run.output_dir", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="data.keep_if='correct' filters the rows of a data.path file"):
        build_sft(cfg)
