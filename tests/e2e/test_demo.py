"""`posttrain demo`: stage wiring, warm-start data, and a tiny end-to-end run via the CLI.

The full-size demo (SFT warm start -> GRPO -> held-out before/after) is measured in
docs/benchmarks.md ("Demo") and asserted by the slow tests/train/rl/test_grpo_heldout.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from posttrain.data.tasks import get_task
from posttrain.train.config.loader import load_config
from posttrain.train.demo import DemoConfig, _stage_configs, results_table, write_sft_data


def test_default_stages_use_the_column_task_without_a_reference(tmp_path):
    cfg = load_config(DemoConfig, None, [])
    sft, rl = _stage_configs(cfg, tmp_path)
    # The warm start reads files written from the task; RL samples from the same task options.
    assert sft.data.path == str(tmp_path / "data" / "sft_train.jsonl") and sft.data.task is None
    assert rl.data.task == "arithmetic" and rl.data.task_options == {"operators": "+-", "trace": "columns"}
    assert rl.model.path == str(tmp_path / "sft" / "final")
    assert rl.eval.temperature == 0.0 and rl.eval.before_after
    assert [r.name for r in rl.rewards] == ["accuracy", "format"]
    # GRPO samples at T=1 from more train-split prompts than SFT saw, with an annealed lr.
    assert rl.rollout.temperature == cfg.temperature == 1.0
    assert rl.data.n_train == cfg.rl_prompts > cfg.sft_examples
    assert rl.optim.schedule == "cosine" and rl.optim.lr == cfg.rl_lr
    pieces = rl.algo.pieces()
    assert pieces.kl_placement == "none" and pieces.advantage == "grpo"
    # Group-mean baseline, batch-std scale: the 0.2 format weight stays small next to accuracy.
    assert pieces.advantage_options.scale == "batch"
    # A KL coefficient puts the preset's KL loss back.
    _, rl_kl = _stage_configs(load_config(DemoConfig, None, ["kl_coef=0.01"]), tmp_path)
    assert rl_kl.algo.pieces().kl_placement == "loss" and rl_kl.algo.pieces().kl_coef == 0.01
    # Another task: options are replaced as a whole, so '{}' clears the arithmetic ones.
    other = load_config(DemoConfig, None, ["task=sorting", "task_options={}", "difficulty=1"])
    assert _stage_configs(other, tmp_path)[1].data.task_options == {}


def test_warm_start_data_is_train_split_and_disjoint_from_heldout(tmp_path):
    cfg = load_config(DemoConfig, None, ["sft_examples=50", "eval_n=40"])
    train_path, eval_path = write_sft_data(cfg, tmp_path)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) >= {"prompt", "completion", "answer"} for r in rows)
    task = get_task(cfg.task, **cfg.task_options)
    assert all(task.score(r["completion"], r["answer"]) == 1.0 for r in rows)
    assert all("; " in r["completion"] for r in rows)  # column traces, several steps
    # The RL stage evaluates on the task's test split with the same seed and level.
    heldout = {
        e.prompt for e in task.examples("test", cfg.eval_n, seed=cfg.run.seed, difficulty=cfg.difficulty)
    }
    assert not heldout & {r["prompt"] for r in rows}
    assert eval_path.is_file()


def test_results_table_formats_percentages():
    before = {"eval/accuracy": 0.25, "eval/format_rate": 0.9, "eval/length_mean": 31.04}
    after = {"eval/accuracy": 0.5, "eval/format_rate": 1.0, "eval/length_mean": 30.0}
    lines = results_table(before, after).splitlines()
    assert lines[2] == "| SFT (before RL)  |    25.0% |      90.0% |      31.0 |"
    assert lines[3] == "| GRPO (after RL)  |    50.0% |     100.0% |      30.0 |"


def test_demo_cli_tiny_run(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [
        "--sft_steps", "3", "--sft_examples", "16", "--sft_batch_size", "8", "--rl_steps", "2",
        "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--eval_n", "4",
        "--eval_every", "1", "--run.output_dir", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "demo", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Progress lines, then the before/after table last.
    assert "[1/3] SFT warm start" in proc.stdout and "[2/3] GRPO" in proc.stdout
    assert "| SFT (before RL)  |" in proc.stdout and "| GRPO (after RL)  |" in proc.stdout
    assert "held-out: greedy decoding on 4 test-split prompts" in proc.stdout
    # transformers' save/load bars are silenced in the demo.
    assert "Writing model shards" not in proc.stderr and "Loading weights" not in proc.stderr
    summary = json.loads((out / "demo.json").read_text())
    assert {"eval_before", "eval_after", "wall_time_s", "cpu_time_s", "plots", "report"} <= set(summary)
    assert summary["eval_before"]["eval/n"] == 4 and summary["eval_after"]["eval/n"] == 4
    assert summary["cpu_time_s"] > 0
    plots = [Path(p) for p in summary["plots"]]
    assert plots and all(p.suffix == ".png" and p.is_file() for p in plots)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.html").is_file()
    assert (out / "results.md").read_text().startswith("| model")
    assert (out / "sft" / "config.yaml").is_file() and (out / "rl" / "config.yaml").is_file()
    assert (out / "rl" / "final").is_dir()
