"""`posttrain bench` as a user runs it: tiny preset, two GRPO steps, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from posttrain.errors import ConfigError
from posttrain.train.bench import BenchConfig, format_markdown, plan, run_bench, summarize, time_to_target
from posttrain.train.config import load_config


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "posttrain", "bench", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_bench_cli_runs_posttrain_steps(tmp_path):
    out = tmp_path / "bench"
    proc = _cli(
        "--presets",
        "[tiny]",
        "--frameworks",
        "[posttrain]",
        "--steps",
        "2",
        "--skip_steps",
        "1",
        "--threads",
        "1",
        "--max_new_tokens",
        "8",
        "--n_train",
        "16",
        "--run.output_dir",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    run = results["models"]["tiny"]["frameworks"]["posttrain"]
    assert run["steps_timed"] == 1
    assert run["median_step_s"] > 0
    assert len(run["reward_curve"]) == 2
    assert all(0.0 <= r <= 1.0 for r in run["reward_curve"])
    assert {"generate_s", "update_s"} <= set(run["phase_median_s"])
    assert run["completion_tokens_per_s"] > 0
    assert results["models"]["tiny"]["params"] > 100_000
    assert "| posttrain |" in (out / "results.md").read_text()
    # The worker ran isolated and left its trace, config and log in the run dir.
    assert (out / "tiny" / "posttrain-r0" / "trace.json").is_file()


def test_bench_accuracy_mode_with_task_options(tmp_path):
    """Time-to-accuracy end to end on a tiny budget: SFT warm start on column-trace
    arithmetic, GRPO with greedy held-out evaluation; the task options reach every stage."""
    out = tmp_path / "acc"
    cfg = load_config(
        BenchConfig,
        None,
        [
            "mode=accuracy",
            "presets=[tiny]",
            "frameworks=[posttrain]",
            "task_options={operators: '+-', trace: columns}",
            "difficulty=2",
            "n_train=16",
            "max_new_tokens=8",
            "threads=1",
            "isolate=false",
            "accuracy.sft_steps=2",
            "accuracy.sft_examples=16",
            "accuracy.sft_batch_size=4",
            "accuracy.n_eval=4",
            "accuracy.eval_every=1",
            "accuracy.max_steps=2",
            "accuracy.target=1.0",
            f"run.output_dir={out}",
        ],
    )
    results = run_bench(cfg)
    run = results["models"]["tiny"]["frameworks"]["posttrain"]
    assert [e["step"] for e in run["evals"]] == [1, 2]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in run["evals"])
    assert "trace: columns" in (out / "tiny" / "sft" / "config.yaml").read_text()
    rl_cfg = (out / "tiny" / "posttrain-r0" / "rl.yaml").read_text()
    assert "trace: columns" in rl_cfg


def test_bench_bad_framework_is_one_line_error(tmp_path):
    proc = _cli("--frameworks", "[trll]", "--run.output_dir", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown framework 'trll'" in lines[0] and "'trl'" in lines[0]


def test_bench_config_validation():
    pytest.importorskip("trl")  # validation of TRL frameworks needs the bench extra
    with pytest.raises(ConfigError, match="group_size"):
        plan(load_config(BenchConfig, None, ["group_size=1"]))
    with pytest.raises(ConfigError, match="skip_steps"):
        plan(load_config(BenchConfig, None, ["steps=2", "skip_steps=2"]))
    text = plan(load_config(BenchConfig, None, ["frameworks=[posttrain,trl]"]))
    assert "4 prompts x G=8" in text and "trl" in text


def test_summarize_pools_rounds_and_skips_warmup():
    traces = [
        {
            "step_s": [9.0, 1.0, 3.0],
            "completion_tokens": [5, 10, 30],
            "reward_mean": [0.0, 0.5, 1.0],
            "phases": {"generate_s": [8.0, 0.5, 1.5]},
            "evals": [],
        },
        {
            "step_s": [7.0, 2.0, 4.0],
            "completion_tokens": [5, 20, 40],
            "reward_mean": [0.0, 0.5, 0.0],
            "phases": {"generate_s": [6.0, 1.0, 2.0]},
            "evals": [],
        },
    ]
    s = summarize(traces, skip=1)
    assert s["steps_timed"] == 4
    assert s["median_step_s"] == pytest.approx(2.5)  # median of 1, 3, 2, 4
    assert s["completion_tokens_per_s"] == pytest.approx(100 / 10)
    assert s["phase_median_s"]["generate_s"] == pytest.approx(1.25)  # median of .5, 1.5, 1, 2
    assert s["reward_curve"] == pytest.approx([0.0, 0.5, 0.5])
    assert s["reward_mean_second_half"] == pytest.approx(0.5)


def test_time_to_target_is_first_crossing():
    evals = [
        {"step": 5, "train_s": 3.0, "accuracy": 0.2},
        {"step": 10, "train_s": 6.5, "accuracy": 0.45},
        {"step": 15, "train_s": 9.0, "accuracy": 0.6},
    ]
    assert time_to_target(evals, 0.4) == 6.5
    assert time_to_target(evals, 0.2) == 3.0
    assert time_to_target(evals, 0.9) is None


def test_markdown_reports_speedup():
    results = {
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "loadavg_1m": 0.5,
            "torch": "t",
            "transformers": "x",
            "trl": "y",
        },
        "config": {"mode": "step", "threads": 2},
        "models": {
            "small": {
                "params": 3_200_000,
                "speedup": {"trl": 3.5},
                "frameworks": {
                    "posttrain": {
                        "median_step_s": 0.2,
                        "completion_tokens_per_s": 4000.0,
                        "phase_median_s": {"generate_s": 0.1},
                        "reward_curve": [0.0, 1.0],
                        "reward_mean_second_half": 1.0,
                    },
                    "trl": {
                        "median_step_s": 0.7,
                        "completion_tokens_per_s": 1000.0,
                        "phase_median_s": {"generate_s": 0.3},
                        "reward_curve": [0.0, 0.0],
                        "reward_mean_second_half": 0.0,
                    },
                },
            }
        },
    }
    md = format_markdown(results)
    assert "| trl | 0.700 | 1000 | 0.300 | 3.50x | 0.000 |" in md
    assert "reward curve (posttrain): [0.00, 1.00]" in md


def test_bench_rollout_mode_in_process(tmp_path):
    cfg = load_config(
        BenchConfig,
        None,
        ["mode=rollout", "presets=[tiny]", "threads=1", "rollout.batch=4", "rollout.new_tokens=4",
         "rollout.repeats=1", f"run.output_dir={tmp_path}"],
    )  # fmt: skip
    results = run_bench(cfg)
    native = results["models"]["tiny"]["frameworks"]["native"]
    assert 0 < native["tokens"][0] <= 4 * 4  # at most batch x new_tokens were generated
    assert native["tokens_per_s"] > 0
    assert "| native |" in (tmp_path / "results.md").read_text()
