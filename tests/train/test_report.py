"""train/common/plots.py + train/common/report.py on synthetic metrics.jsonl files."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.errors import ConfigError
from posttrain.train.common.metrics import MetricsLogger
from posttrain.train.common.plots import plot_run
from posttrain.train.common.report import summarize_run, write_report
from posttrain.train.config.loader import RunSection, save_config


def _fake_run(path, slope: float, steps: int = 12):
    save_config(RunSection(output_dir=str(path), seed=3), path / "config.yaml")
    with MetricsLogger(path) as log:
        log.log(0, {"eval/accuracy": 0.1})
        for s in range(1, steps + 1):
            log.log(
                s,
                {
                    "reward/mean": slope * s,
                    "kl/k3": 0.01 * s,
                    "kl/coef": 0.05,
                    "response/length_mean": 30 + s,
                    "loss/total": 1.0 / s,
                    "time/step_s": 0.5,
                    "policy/clipfrac": 0.1,
                },
            )
        log.log(steps, {"eval/accuracy": 0.1 + slope * steps})
    (path / "eval.json").write_text(json.dumps({"pass@1": 0.42, "task": "arithmetic"}))
    return path


def test_plots_written_for_each_panel_with_data(tmp_path):
    a = _fake_run(tmp_path / "grpo", 0.05)
    b = _fake_run(tmp_path / "ppo", 0.03)
    pngs = plot_run([a, b], tmp_path / "out")
    assert sorted(p.name for p in pngs) == ["accuracy.png", "kl.png", "length.png", "loss.png", "reward.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_summary_final_best_and_wall_time(tmp_path):
    s = summarize_run(_fake_run(tmp_path / "run", 0.05, steps=4))
    assert s["last_step"] == 4 and s["rows"] == 6
    assert s["wall_time_s"] == pytest.approx(4 * 0.5)  # sum of time/step_s
    assert s["metrics"]["reward/mean"] == pytest.approx({"first": 0.05, "final": 0.2, "best": 0.2})
    assert s["metrics"]["loss/total"] == pytest.approx({"first": 1.0, "final": 0.25, "best": 0.25})
    assert s["metrics"]["kl/k3"]["best"] == pytest.approx(0.01)  # lower KL is "best"
    assert s["metrics"]["eval/accuracy"] == pytest.approx({"first": 0.1, "final": 0.3, "best": 0.3})
    assert "kl/coef" not in s["metrics"]  # a coefficient, not a divergence
    assert s["extra"]["eval.json"]["pass@1"] == 0.42


def test_report_markdown_and_html(tmp_path):
    a = _fake_run(tmp_path / "grpo", 0.05)
    b = _fake_run(tmp_path / "ppo", 0.03)
    md = write_report([a, b], tmp_path / "rep")
    text = md.read_text()
    assert "| run | last step | rows | wall time (s) | directory |" in text
    assert "![reward](reward.png)" in text
    assert "| reward/mean | 0.05 / 0.6 / 0.6 | 0.03 / 0.36 / 0.36 |" in text
    assert "seed: 3" in text  # config excerpt
    assert "| pass@1 | 0.42 |" in text
    page = (tmp_path / "rep" / "report.html").read_text()
    assert '<img src="reward.png"' in page and "<table>" in page and "seed: 3" in page
    assert (tmp_path / "rep" / "reward.png").is_file()


def test_null_values_are_skipped_not_plotted_as_zero(tmp_path):
    with MetricsLogger(tmp_path / "r") as log:
        log.log(1, {"loss/total": 1.0})
        log.log(2, {"loss/total": math.nan})
        log.log(3, {"loss/total": 0.5})
    s = summarize_run(tmp_path / "r")
    assert s["metrics"]["loss/total"] == pytest.approx({"first": 1.0, "final": 0.5, "best": 0.5})


def test_missing_run_dir_and_metrics(tmp_path):
    with pytest.raises(ConfigError, match="run directory not found: .*nope"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metrics.jsonl in run directory"):
        plot_run(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
