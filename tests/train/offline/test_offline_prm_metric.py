"""The PRM's held-out first-wrong-step metric and its baselines, against hand counts."""

from __future__ import annotations

import pytest
import torch

from posttrain.engines.tokenizer import build_char_tokenizer
from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import PRMConfig, build_prm, plan
from posttrain.train.offline.data import encode_steps, until_first_error
from posttrain.train.offline.methods import PRMMethod


class MarkScorer(torch.nn.Module):
    """A stand-in PRM: at the separator after a step ending in "X" logit −4 (σ 0.02), after
    one ending in "Y" logit 0.5 (σ 0.62: a fall from σ(4) = 0.98 that stays above the 0.5
    threshold), +4 everywhere else."""

    def __init__(self, tok):
        super().__init__()
        self.x, self.y = tok.convert_tokens_to_ids("X"), tok.convert_tokens_to_ids("Y")
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        before = torch.roll(input_ids, 2, dims=1)  # the token two back: the step's last char before "; "
        out = torch.full(input_ids.shape, 4.0)
        out[before == self.x] = -4.0
        out[before == self.y] = 0.5
        return out + self.w


def test_first_error_rate_hand_counts():
    tok = build_char_tokenizer()
    cfg = load_config(PRMConfig, None, ["--data.task", "null"])
    rows = [
        {
            "prompt": "a",
            "completions": ["1", "2X", "3"],
            "labels": [True, False, False],
        },  # both rules: step 1, right
        {"prompt": "b", "completions": ["1X", "2"], "labels": [False, False]},  # both: step 0, right
        {
            "prompt": "c",
            "completions": ["1", "2X"],
            "labels": [False, False],
        },  # both: step 1, wrong (truth 0)
        {
            "prompt": "d",
            "completions": ["1", "2Y", "3"],
            "labels": [True, False, False],
        },  # drop: 1 right; threshold: none
        {"prompt": "e", "completions": ["1", "2"], "labels": [True, True]},  # no wrong step: not counted
    ]
    items = encode_steps(rows, tok, cfg.data, "rows")
    method = PRMMethod(cfg, MarkScorer(tok), tok, items, items)
    got = method.first_error_rate(items)
    assert got["eval/prm_first_error_acc"] == pytest.approx(2 / 4)
    assert got["eval/prm_first_error_acc_drop"] == pytest.approx(3 / 4)
    assert got["eval/prm_first_error_chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 1 / 3) / 4)
    assert got["eval/prm_first_error_majority"] == pytest.approx(2 / 4)  # truths 1, 0, 0, 1


def test_until_first_error_cuts_wrong_traces_after_their_first_wrong_step():
    items = [
        {"prompt": [1], "steps": [[2], [3], [4]], "labels": [True, False, False]},
        {"prompt": [1], "steps": [[2], [3]], "labels": [False, False]},
        {"prompt": [1], "steps": [[2], [3]], "labels": [True, True]},
    ]
    cut = until_first_error(items)
    assert [it["labels"] for it in cut] == [[True, False], [False], [True, True]]
    assert [it["steps"] for it in cut] == [[[2], [3]], [[2]], [[2], [3]]]
    assert items[0]["labels"] == [True, False, False]  # the input is not modified


def test_build_prm_until_first_error_keeps_whole_held_out_traces(tmp_path):
    cfg = load_config(PRMConfig, None, [
        "--run.output_dir", str(tmp_path / "prm"), "--data.difficulty", "2", "--data.n_train", "8",
        "--data.n_eval", "4", "--data.task_options", "{operators: '+-', trace: columns, slips: any}",
        "--algo.until_first_error", "true",
    ])  # fmt: skip
    method, _ = build_prm(cfg)
    wrong = [it for it in method.train_items if not all(it["labels"])]
    assert wrong and all(it["labels"][-1] is False and it["labels"].count(False) == 1 for it in wrong)
    assert all(len(it["steps"]) == 3 for it in method.eval_traces)  # column traces of 2-digit +/-
    assert sum(len(it["steps"]) for it in method.eval_items) < sum(
        len(it["steps"]) for it in method.eval_traces
    )
    assert "labels up to the first wrong step" in plan(cfg)
