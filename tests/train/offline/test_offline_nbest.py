"""N-best preferences for `posttrain dpo` (data.format=ranked, algo.pair_weighting=gap):
pairs induced from ranked rows and their weights by hand, the weighted loss of DPO / IPO /
SimPO by hand, config and data errors, and learning on a tiny ranked set."""

from __future__ import annotations

import json
import random

import pytest
import torch

import posttrain.train.offline.loop as loop
from posttrain import cli
from posttrain.algos.preference import preference_loss
from posttrain.errors import ConfigError, DataError
from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import DPOConfig, build_dpo, run_dpo


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(tmp_path, *overrides):
    args = ["--data.format", "ranked", "--run.output_dir", str(tmp_path / "run"), "--ref.cache_dir",
            str(tmp_path / "cache"), "--train.eval_every", "0", "--train.eval_generations", "0"]  # fmt: skip
    return load_config(DPOConfig, None, [*args, *overrides])


ROWS = [
    {"prompt": "p", "completions": ["aa", "ab", "bb", "ba"], "scores": [3, 1, 0, 1]},
    {"prompt": "q", "completions": ["x", "y", "z"], "ranks": [2, 1, 3]},
]


def test_ranked_rows_become_every_induced_pair_weighted_by_gap(tmp_path):
    path = _write(tmp_path / "r.jsonl", ROWS)
    method, tok = build_dpo(_cfg(tmp_path, "--data.path", str(path), "--data.eval_fraction", "0",
                                 "--algo.pair_weighting", "gap", "--data.task", "null"))  # fmt: skip
    text = [(tok.decode(it["chosen"][:-1]), tok.decode(it["rejected"][:-1])) for it in method.train_items]
    # row 1: scores 3,1,0,1 -> (aa,ab) 2, (aa,bb) 3, (aa,ba) 2, (ab,bb) 1, (ba,bb) 1; the ab/ba tie gives none
    # row 2: ranks 2,1,3 -> scores -2,-1,-3 -> (x,z) 1, (y,x) 1, (y,z) 2
    assert text == [("aa", "ab"), ("aa", "bb"), ("aa", "ba"), ("ab", "bb"), ("ba", "bb"),
                    ("x", "z"), ("y", "x"), ("y", "z")]  # fmt: skip
    gaps = [2, 3, 2, 1, 1, 1, 1, 2]
    assert [it["gap"] for it in method.train_items] == gaps
    mean = sum(gaps) / 8  # 13/8 = 1.625
    assert [it["weight"] for it in method.train_items] == pytest.approx([g / mean for g in gaps])
    assert all(it["chosen"][-1] == tok.eos_token_id for it in method.train_items)
    plain, _ = build_dpo(
        _cfg(tmp_path, "--data.path", str(path), "--data.eval_fraction", "0", "--data.task", "null")
    )
    assert [it["weight"] for it in plain.train_items] == [1.0] * 8


def test_weighted_preference_loss_by_hand():
    # DPO beta 1: h = (c - rc) - (r - rr); pair 1 h = 1 - 0 = 1, pair 2 h = 0 - 2 = -2
    logps = torch.tensor([-1.0, -3.0, -2.0, -1.0], dtype=torch.float64)  # chosen 1, 2; rejected 1, 2
    ref = torch.tensor([-2.0, -3.0, -2.0, -3.0], dtype=torch.float64)
    lengths = torch.ones(4, dtype=torch.float64)
    common = dict(loss_name="dpo", beta=1.0, num_pairs=2)
    loss, _ = preference_loss(logps, lengths, ref, weights=torch.tensor([1.5, 0.5]), **common)
    softplus = torch.nn.functional.softplus
    l1, l2 = softplus(torch.tensor(-1.0)).item(), softplus(torch.tensor(2.0)).item()  # -log σ(1), -log σ(-2)
    assert loss.item() == pytest.approx((1.5 * l1 + 0.5 * l2) / 2)
    plain, _ = preference_loss(logps, lengths, ref, **common)
    assert plain.item() == pytest.approx((l1 + l2) / 2)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_gap_weighted_step_loss_is_the_weighted_sum_of_pair_losses(tmp_path, loss):
    """For each loss: the step loss with gap weights == Σ_i w_i · loss_i / n, loss_i from
    the same pair alone and unweighted."""
    path = _write(tmp_path / "r.jsonl", ROWS)
    common = (
        "--data.path",
        str(path),
        "--data.eval_fraction",
        "0",
        "--data.task",
        "null",
        "--algo.loss",
        loss,
    )
    weighted, _ = build_dpo(_cfg(tmp_path, *common, "--algo.pair_weighting", "gap"))
    plain, _ = build_dpo(_cfg(tmp_path, *common))
    for method in (weighted, plain):  # move both policies off the reference alike: pair losses differ
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in method.model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    items = weighted.train_items
    total, _ = loop.run_microbatches(weighted, items, 3, train=False)
    single = [loop.run_microbatches(plain, [it], 1, train=False)[0] for it in plain.train_items]
    assert len({round(s, 4) for s in single}) > 2
    assert total == pytest.approx(
        sum(it["weight"] * s for it, s in zip(items, single)) / len(items), rel=1e-5
    )
    assert total != pytest.approx(sum(single) / len(items), rel=1e-3)


def test_settings_for_the_other_format_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.format=ranked"):
        build_dpo(_cfg(tmp_path, "--data.format", "pairs", "--algo.pair_weighting", "gap"))
    with pytest.raises(ConfigError, match="data.pairs=self"):
        build_dpo(_cfg(tmp_path, "--data.pairs", "self"))


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 1]}, "same score"),
        ({"prompt": "p", "completions": ["a", "a"], "scores": [1, 0]}, "same candidate twice"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1]}, "one entry per completion"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 0], "ranks": [1, 2]}, "exactly one of"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1]}, "integers >= 1"),
        ({"prompt": "p", "completions": ["a"], "scores": [1]}, "at least 2"),
    ],
)
def test_bad_ranked_rows_are_one_line_data_errors(tmp_path, row, expected):
    path = _write(tmp_path / "bad.jsonl", [row] * 3)
    with pytest.raises(DataError, match=expected):
        build_dpo(_cfg(tmp_path, "--data.path", str(path), "--data.task", "null"))


def test_dry_run_and_synthetic_ranked_rows(tmp_path, capsys):
    assert cli.main(["dpo", "--data.format", "ranked", "--algo.pair_weighting", "gap", "--dry-run"]) == 0
    assert (
        "every pair induced by each ranked list (s_i > s_j), weighted by score gap" in capsys.readouterr().out
    )
    method, _ = build_dpo(_cfg(tmp_path, "--data.task", "sorting", "--data.difficulty", "2", "--data.n_train", "8",
                               "--data.n_eval", "4", "--algo.pair_weighting", "gap"))  # fmt: skip
    gaps = [it["gap"] for it in method.train_items]  # solution (1) over the wrong one (partial credit)
    assert len(gaps) == 8 and all(0 < g <= 1 for g in gaps)


def _letters(n: int, seed: int) -> list[dict]:
    """Ranked rows: 4 distinct 6-letter strings of a/b per prompt, scored by their a's."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cands: set[str] = set()
        while len(cands) < 4:
            k = rng.randint(0, 6)
            letters = ["a"] * k + ["b"] * (6 - k)
            rng.shuffle(letters)
            cands.add("".join(letters))
        ordered = sorted(cands)
        rows.append(
            {"prompt": f"Say {i % 10}", "completions": ordered, "scores": [c.count("a") for c in ordered]}
        )
    return rows


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_nbest_training_learns_heldout_rankings(tmp_path, loss):
    train = _write(tmp_path / "train.jsonl", _letters(200, 0))
    held = _write(tmp_path / "held.jsonl", _letters(30, 1))
    cfg = _cfg(tmp_path, "--data.path", str(train), "--data.eval_path", str(held), "--data.task", "null",
               "--algo.loss", loss, "--algo.pair_weighting", "gap", "--train.steps", "30", "--train.batch_size",
               "16", "--train.micro_batch_size", "16", "--train.eval_every", "30", "--optim.lr", "1e-3")  # fmt: skip
    summary = run_dpo(cfg)
    before, after = summary["initial_eval"], summary["final"]
    assert after["eval/pref/accuracy"] > 0.9, (before, after)
    assert after["eval/loss"] < 0.3 * before["eval/loss"], (before, after)
