"""Paired comparison of frameworks over GRPO seeds (trlbench.report) and pooling of runs."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.errors import ConfigError
from posttrain.train.config.loader import config_to_dict, load_config
from trlbench.bench import BenchConfig, combine_results, format_combined, paired_summary
from trlbench.report import sign_flip_p, t_quantile_975


def test_t_quantiles_by_hand_and_continuous_past_the_table():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(9) == pytest.approx(2.262, abs=1e-3)
    # Past the table the expansion takes over: t(40) = 2.0211, t(120) = 1.9799 (printed tables).
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)
    assert abs(t_quantile_975(31) - t_quantile_975(30)) < 0.005  # no jump at the seam
    assert t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_sign_flip_p_by_hand():
    # d = [1, 2, 3]: the 8 sign patterns sum to 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 twice.
    assert sign_flip_p([1.0, 2.0, 3.0]) == (0.25, True)
    # One pair can never be significant: both signs reach |d|.
    assert sign_flip_p([0.3]) == (1.0, True)
    # All equal differences of one sign, n = 4: only the all-plus and all-minus patterns.
    assert sign_flip_p([0.1] * 4) == (2 / 16, True)
    # Zero differences: every pattern ties the observed 0.
    assert sign_flip_p([0.0, 0.0]) == (1.0, True)
    with pytest.raises(ValueError):
        sign_flip_p([])


def test_sign_flip_p_sampled_matches_exact():
    diffs = [0.05, -0.02, 0.08, 0.01, 0.04, -0.03, 0.06, 0.02, 0.07, -0.01, 0.03, 0.05]
    exact, is_exact = sign_flip_p(diffs)
    sampled, sampled_exact = sign_flip_p(diffs, exact_up_to=4)
    assert is_exact and not sampled_exact
    assert sampled == pytest.approx(exact, abs=0.01)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=8))
def test_sign_flip_p_is_symmetric_and_a_probability(diffs):
    p, _ = sign_flip_p(diffs)
    assert 0 < p <= 1
    assert sign_flip_p([-d for d in diffs])[0] == pytest.approx(p)  # the sign of all pairs
    assert sign_flip_p(list(reversed(diffs)))[0] == pytest.approx(p)  # the order of the seeds


def _row(seed, pt, other, reward=None):
    fw = lambda a, r: {"final_accuracy": a, "mean_reward": r}
    return {"seed": seed, "frameworks": {"posttrain": fw(pt, reward), "trl": fw(other, reward)}}


def test_paired_summary_by_hand():
    # Differences 0.1, 0.0, -0.05, 0.15: mean 0.05; deviations
    # 0.05, -0.05, -0.1, 0.1 give a sample sd of sqrt(0.025 / 3) = 0.091287.
    rows = [_row(0, 0.5, 0.4), _row(1, 0.3, 0.3), _row(2, 0.35, 0.4), _row(3, 0.45, 0.3)]
    s = paired_summary(rows, "final_accuracy")["trl"]
    assert s["n"] == 4
    assert s["mean_posttrain"] == pytest.approx(0.4) and s["mean_other"] == pytest.approx(0.35)
    assert s["mean_diff"] == pytest.approx(0.05)
    assert s["sd_diff"] == pytest.approx(math.sqrt(0.025 / 3))
    se = math.sqrt(0.025 / 3) / 2
    assert s["se_diff"] == pytest.approx(se)
    assert s["ci95"] == pytest.approx([0.05 - 3.1824 * se, 0.05 + 3.1824 * se])
    assert (s["wins"], s["losses"], s["ties"]) == (2, 1, 1)
    # |sum| = 0.2; the signs of 0.1, 0.05, 0.15 give sums 0.3, 0.2, 0, -0.1, 0.1, 0, -0.2, -0.3, so
    # 4 of 8 reach it, and the zero difference's sign doubles every pattern: p = 8 / 16.
    diffs = [0.1, 0.0, -0.05, 0.15]
    assert s["p_sign_flip"] == pytest.approx(sign_flip_p(diffs)[0]) and s["p_exact"]
    assert sign_flip_p(diffs)[0] == pytest.approx(8 / 16)


def test_paired_summary_skips_missing_metrics_and_single_seeds():
    rows = [
        _row(0, 0.5, 0.4),
        _row(1, None, 0.3),
        {"seed": 2, "frameworks": {"posttrain": {"final_accuracy": 0.2}}},
    ]
    s = paired_summary(rows, "final_accuracy")["trl"]
    assert s["n"] == 1 and s["sd_diff"] is None and s["ci95"] is None and s["p_sign_flip"] == 1.0
    assert paired_summary(rows, "mean_reward") == {}


def _write_run(out, seeds, accs, **overrides):
    """A finished isolated accuracy run on disk: results.json plus one trace per (fw, seed)."""
    opts = ["mode=accuracy", "frameworks=[posttrain,trl]", "presets=[tiny]", f"rl_seeds={list(seeds)}",
            f"run.output_dir={out}"] + [f"{k}={v}" for k, v in overrides.items()]  # fmt: skip
    cfg = load_config(BenchConfig, None, opts)
    results = {"machine": {}, "config": config_to_dict(cfg),
               "models": {"tiny": {"sft_accuracy": 0.3, "target": 0.4}}}  # fmt: skip
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(results))
    for seed, (a_pt, a_trl) in zip(seeds, accs, strict=True):
        for fw, acc, reward in (("posttrain", a_pt, 0.2), ("trl", a_trl, 0.1)):
            d = out / "tiny" / f"{fw}-s{seed}-r0" if len(seeds) > 1 else out / "tiny" / f"{fw}-r0"
            d.mkdir(parents=True)
            trace = {"step_s": [1.0, 1.0], "reward_mean": [reward, reward + 0.1],
                     "evals": [{"step": 2, "train_s": 2.0, "accuracy": acc}]}  # fmt: skip
            (d / "trace.json").write_text(json.dumps(trace))


def test_combine_pools_seeds_of_runs_and_reports_them(tmp_path):
    _write_run(tmp_path / "a", [0, 1], [(0.5, 0.4), (0.3, 0.3)], threads=1)
    _write_run(tmp_path / "b", [2], [(0.45, 0.35)], threads=2)  # threads may differ
    combined = combine_results([tmp_path / "a", tmp_path / "b"])
    tiny = combined["models"]["tiny"]
    assert [r["seed"] for r in tiny["seeds"]] == [0, 1, 2]
    acc = tiny["paired"]["final_accuracy"]["trl"]
    assert acc["n"] == 3 and acc["mean_diff"] == pytest.approx(statistics.fmean([0.1, 0.0, 0.1]))
    reward = tiny["paired"]["mean_reward"]["trl"]
    assert reward["mean_diff"] == pytest.approx(0.1) and reward["wins"] == 3  # 0.25 vs 0.15 each seed
    md = format_combined(combined)
    assert "| 2 | trl |" in md and "sign-flip p" in md and "mean training reward" in md


def test_combine_refuses_other_recipes_duplicate_seeds_and_step_runs(tmp_path):
    _write_run(tmp_path / "a", [0, 1], [(0.5, 0.4), (0.3, 0.3)])
    _write_run(tmp_path / "lr", [2], [(0.5, 0.4)], lr=5e-4)
    with pytest.raises(ConfigError, match="another recipe.*differs in lr"):
        combine_results([tmp_path / "a", tmp_path / "lr"])
    _write_run(tmp_path / "dup", [1, 3], [(0.5, 0.4), (0.3, 0.3)])
    with pytest.raises(ConfigError, match="seed 1 of tiny is in both"):
        combine_results([tmp_path / "a", tmp_path / "dup"])
    # A run made before an option existed has no key for it: it counts as the default.
    _write_run(tmp_path / "old", [5], [(0.5, 0.4)])
    raw = json.loads((tmp_path / "old" / "results.json").read_text())
    del raw["config"]["kl_estimator"]
    (tmp_path / "old" / "results.json").write_text(json.dumps(raw))
    assert [
        r["seed"] for r in combine_results([tmp_path / "a", tmp_path / "old"])["models"]["tiny"]["seeds"]
    ] == [
        0,
        1,
        5,
    ]
    with pytest.raises(ConfigError, match="no results.json"):
        combine_results([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="at least one"):
        combine_results([])
