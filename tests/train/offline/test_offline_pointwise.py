"""`posttrain rm --algo.loss pointwise`: scored rows, the per-prompt baseline, accumulation
invariance, config and data errors, and measurable learning on a tiny synthetic set."""

from __future__ import annotations

import json
import random

import pytest
import torch

import posttrain.train.offline.loop as loop
from posttrain import cli
from posttrain.errors import ConfigError, DataError
from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import RMConfig, build_rm, run_rm
from posttrain.train.offline.scored import pearson


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _count_rows(n: int, seed: int = 0, prompts: int = 12) -> list[dict]:
    """Completions of 8 letters a/b; rating = share of a's + 2·(prompt number): the prompt
    shifts every score, the letters rank the completions of one prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(0, 8)
        letters = ["a"] * k + ["b"] * (8 - k)
        rng.shuffle(letters)
        p = i % prompts
        rows.append({"prompt": f"Rate {p}", "completion": "".join(letters), "rating": k / 8 + 2.0 * p})
    return rows


def _cfg(tmp_path, *overrides):
    args = ["--algo.loss", "pointwise", "--run.output_dir", str(tmp_path / "run"), "--train.eval_every", "0"]
    return load_config(RMConfig, None, [*args, *overrides])


def test_pearson_from_summed_moments_by_hand():
    # pred 1,2,3 vs target 1,3,2: means 2, 2; cov = (−1·−1 + 0·1 + 1·0)/3 = 1/3; var 2/3 each -> r = 0.5
    sums = {"rm/n": 3, "rm/pred_sum": 6, "rm/target_sum": 6, "rm/pred_sq_sum": 14, "rm/target_sq_sum": 14,
            "rm/cross_sum": 1 + 6 + 6}  # fmt: skip
    assert pearson(sums) == pytest.approx(0.5)
    assert pearson({**sums, "rm/pred_sq_sum": 12}) != pearson(
        {**sums, "rm/pred_sq_sum": 12}
    )  # no variance: NaN


def test_baseline_subtracts_each_prompts_mean_score(tmp_path):
    rows = [
        {"prompt": "p", "completion": "aa", "score": 1.0},
        {"prompt": "q", "completion": "ab", "score": 5.0},
        {"prompt": "p", "completion": "bb", "score": 3.0},
        {"prompt": "q", "completion": "ba", "score": 5.0},
    ]
    path = _write(tmp_path / "s.jsonl", rows)
    common = ("--data.path", str(path), "--data.eval_fraction", "0")
    method, _ = build_rm(_cfg(tmp_path, *common, "--algo.baseline", "prompt_mean"))
    assert [it["baseline"] for it in method.train_items] == [2.0, 5.0, 2.0, 5.0]
    assert [it["score"] for it in method.train_items] == [1.0, 5.0, 3.0, 5.0]
    plain, _ = build_rm(_cfg(tmp_path, *common))
    assert [it["baseline"] for it in plain.train_items] == [0.0] * 4


def test_synthetic_task_gives_solution_and_partial_credit_rows(tmp_path):
    method, _ = build_rm(
        _cfg(
            tmp_path,
            "--data.task",
            "sorting",
            "--data.difficulty",
            "2",
            "--data.n_train",
            "8",
            "--data.n_eval",
            "4",
        )
    )
    scores = [it["score"] for it in method.train_items]
    assert len(scores) == 16 and scores[0::2] == [1.0] * 8
    assert all(0.0 <= s < 1.0 for s in scores[1::2]) and len(set(scores[1::2])) > 1


def test_gradient_accumulation_invariance(tmp_path):
    path = _write(tmp_path / "s.jsonl", _count_rows(16))
    grads = []
    for micro in (8, 1):
        cfg = _cfg(tmp_path, "--data.path", str(path), "--algo.score_column", "rating",
                   "--algo.baseline", "prompt_mean", "--train.batch_size", "8", "--train.micro_batch_size", str(micro))  # fmt: skip
        method, _ = build_rm(cfg)
        loss, sums = loop.run_microbatches(method, method.train_items[:8], micro, train=True)
        grads.append(
            (
                loss,
                sums,
                [p.grad.clone() for p in method.models["reward_model"].parameters() if p.grad is not None],
            )
        )
    (l8, s8, g8), (l1, s1, g1) = grads
    assert l1 == pytest.approx(l8, rel=1e-5) and s1 == pytest.approx(s8, rel=1e-5, abs=1e-5)
    for a, b in zip(g8, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "rows, column, expected",
    [
        ([{"prompt": "p", "completion": "a"}], "score", "column 'score' is missing"),
        ([{"prompt": "p", "completion": "a", "score": "high"}], "score", "must be a finite number"),
        ([{"prompt": "p", "completion": "a", "score": float("nan")}], "score", "must be a finite number"),
        (
            [{"prompt": "p", "completion": "a", "score": 1, "rating": 2}],
            "rating",
            "maps to 'score', which also exists",
        ),
    ],
)
def test_bad_scored_rows_are_one_line_data_errors(tmp_path, rows, column, expected):
    path = _write(tmp_path / "bad.jsonl", rows * 4)
    with pytest.raises(DataError, match=expected):
        build_rm(_cfg(tmp_path, "--data.path", str(path), "--algo.score_column", column))


def test_settings_of_the_other_loss_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="margin_column"):
        build_rm(_cfg(tmp_path, "--algo.margin_column", "m"))
    with pytest.raises(ConfigError, match="baseline"):
        build_rm(_cfg(tmp_path, "--algo.loss", "bradley_terry", "--algo.baseline", "prompt_mean"))


def test_cli_dry_run_names_the_pointwise_loss(capsys):
    assert cli.main(["rm", "--algo.loss", "pointwise", "--algo.baseline", "prompt_mean", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pointwise MSE on column 'score', minus each prompt's mean score" in out


def test_pointwise_reward_model_learns_heldout_scores(tmp_path):
    """Held-out Pearson correlation of predicted vs true (prompt-centred) scores rises from
    chance to > 0.8 in 40 steps; the saved model scores as trained."""
    path = _write(tmp_path / "scored.jsonl", _count_rows(600))
    cfg = _cfg(tmp_path, "--data.path", str(path), "--data.eval_fraction", "0.2", "--algo.score_column", "rating",
               "--algo.baseline", "prompt_mean", "--train.steps", "40", "--train.batch_size", "16",
               "--train.micro_batch_size", "16", "--train.eval_every", "40", "--optim.lr", "1e-3")  # fmt: skip
    summary = run_rm(cfg)
    before, after = summary["initial_eval"], summary["final"]
    assert after["eval/rm/pearson"] > 0.8, (before, after)
    assert after["eval/rm/pearson"] > before["eval/rm/pearson"] + 0.5, (before, after)
    assert after["eval/rm/mse"] < 0.1 * before["eval/rm/mse"], (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "rm/pearson" in rows[-1] and "rm/mse" in rows[-1]
