"""`posttrain annotate`: Monte-Carlo step labels (the GRPO seed's "automatic annotation",
Math-Shepherd) — prefixes and labels by hand with a scripted completer, the command end
to end, and (slow) labels from a trained completer that find the known first wrong step
well above chance."""

from __future__ import annotations

import json

import pytest

from posttrain import cli
from posttrain.train.offline.prm_annotate import agreement, annotate, first_false, mc_labels, step_prefixes


def test_prefixes_follow_the_solution_format():
    assert step_prefixes(["7+5=12", "4+3+1=8", "47+35=82"]) == [
        "<think>7+5=12; ",
        "<think>7+5=12; 4+3+1=8; ",
        "<think>7+5=12; 4+3+1=8; 47+35=82</think>",
    ]


def test_mc_labels_by_hand():
    # k = 4; right continuations 3, 1, 0 -> soft 0.75, 0.25, 0; hard true, true, false
    assert mc_labels([3, 1, 0], 4) == ([True, True, False], [0.75, 0.25, 0.0])
    assert first_false([True, True, False]) == 2 and first_false([True]) is None
    with pytest.raises(ValueError):
        mc_labels([5], 4)


def test_annotate_with_a_scripted_completer_by_hand():
    """A completer that finishes right exactly `good[prefix]` times out of k = 4."""
    rows = [
        {"prompt": "q1", "completions": ["a", "b", "c"], "answer": "1", "labels": [True, False, False]},
        {"prompt": "q2", "completions": ["d", "e"], "answer": "2", "labels": [True, True]},
    ]
    good = {"<think>a; ": 4, "<think>a; b; ": 0, "<think>a; b; c</think>": 1,  # q1: MC says step 2 is wrong
            "<think>d; ": 2, "<think>d; e</think>": 3}  # fmt: skip
    seen = []

    def sample(prompts, prefixes, k):
        seen.extend(zip(prompts, prefixes))
        return [["RIGHT"] * good[x] + ["WRONG"] * (k - good[x]) for x in prefixes]

    out = annotate(rows, sample, lambda text, answer: float(text.endswith("RIGHT")), k=4)
    assert seen == [("q1", "<think>a; "), ("q1", "<think>a; b; "), ("q1", "<think>a; b; c</think>"),
                    ("q2", "<think>d; "), ("q2", "<think>d; e</think>")]  # fmt: skip
    assert out[0]["labels"] == [True, False, True] and out[0]["soft_labels"] == [1.0, 0.0, 0.25]
    assert out[1]["labels"] == [True, True] and out[1]["soft_labels"] == [0.5, 0.75]
    assert out[0]["given_labels"] == [True, False, False]
    # q1: MC first wrong = 1 = given first wrong -> 1/1 hit; chance 1/3; steps agree 2 of 3 + 2 of 2
    stats = agreement(out)
    assert stats["first_wrong_acc"] == 1.0 and stats["first_wrong_chance"] == pytest.approx(1 / 3)
    assert stats["first_wrong_majority"] == 1.0  # one trace: its own position is the majority
    assert stats["step_agreement"] == pytest.approx(4 / 5) and stats["traces_with_a_wrong_step"] == 1


def test_annotate_command_writes_a_stepwise_file_prm_trains_on(tmp_path, capsys):
    out = tmp_path / "ann"
    args = ["annotate", "--model.preset", "tiny", "--data.n", "2", "--k", "2", "--max_new_tokens", "8",
            "--output_dir", str(out)]  # fmt: skip
    assert cli.main([*args, "--dry-run"]) == 0 and "k=2 continuations" in capsys.readouterr().out
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (out / "stepwise.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(
        len(r["labels"]) == len(r["completions"]) == len(r["soft_labels"]) for r in rows
    )
    assert all(s in (0.0, 0.5, 1.0) for r in rows for s in r["soft_labels"])
    prm = ["prm", "--data.path", str(out / "stepwise.jsonl"), "--data.eval_fraction", "0", "--train.steps", "1",
           "--train.batch_size", "2", "--train.micro_batch_size", "2", "--train.eval_every", "0",
           "--run.output_dir", str(tmp_path / "prm")]  # fmt: skip
    assert cli.main(prm) == 0
    assert (tmp_path / "prm" / "final" / "prm.json").is_file()


@pytest.mark.slow
def test_mc_labels_find_the_known_first_wrong_step_above_chance(tmp_path):
    """Completer: tiny SFT on two-digit +/- column traces (320 steps, ~60% greedy). On 64
    problems with any-value column slips (traces whose slipped column is visibly off), the
    first step with no right continuation in k = 8 is the known first wrong step about two
    times in three: ~2x a uniform guess, and above always naming the most common position."""
    columns = ["--data.difficulty", "2", "--data.task_options", "{operators: '+-', trace: columns}"]
    sft = ["sft", "--run.output_dir", str(tmp_path / "sft"), "--train.steps", "320", "--data.n_train", "8000",
           "--optim.lr", "3e-3", "--train.eval_every", "0", "--train.eval_generations", "0", *columns]  # fmt: skip
    assert cli.main(sft) == 0
    out = tmp_path / "ann"
    ann = ["annotate", "--model.path", str(tmp_path / "sft" / "final"), "--data.difficulty", "2", "--data.n", "64",
           "--data.task_options", "{operators: '+-', trace: columns, slips: any}", "--k", "8",
           "--output_dir", str(out)]  # fmt: skip
    assert cli.main(ann) == 0
    stats = json.loads((out / "summary.json").read_text())
    assert stats["traces_with_a_wrong_step"] == 64
    assert stats["first_wrong_acc"] >= stats["first_wrong_chance"] + 0.2, stats
    assert stats["first_wrong_acc"] >= stats["first_wrong_majority"] + 0.05, stats
