"""train/common/metrics.py: JSONL rows, resume truncation, torn lines, postfix, trackers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train.common.metrics import MetricsLogger, format_postfix, progress, read_jsonl


def test_rows_written_and_flushed(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"reward/mean": torch.tensor(0.5), "kl/k3": np.float32(0.25), "policy/clipfrac": 0})
    # readable before close: every row is flushed as it is written
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "reward/mean": 0.5, "kl/k3": 0.25, "policy/clipfrac": 0}
    ]
    log.log(2, {"loss": float("nan")})
    log.log_samples(2, [{"prompt": "1+1", "completion": "2", "reward": 1.0}])
    log.close()
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "loss": None}  # strict JSON, no NaN token
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 2, "prompt": "1+1", "completion": "2", "reward": 1.0}
    ]


def test_bad_metric_values_rejected(tmp_path):
    with MetricsLogger(tmp_path) as log:
        with pytest.raises(TypeError, match="metric 'x' must be a number"):
            log.log(1, {"x": "high"})
        with pytest.raises(TypeError, match="metric 'v' is not a scalar"):
            log.log(1, {"v": torch.ones(3)})


def test_resume_truncates_rows_past_checkpoint_and_torn_line(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for s in range(1, 6):
            log.log(s, {"reward/mean": s / 10})
            log.log_samples(s, [{"completion": str(s)}])
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "reward/me')  # a crash mid-line by some other writer
    with MetricsLogger(tmp_path, resume_step=3) as log:
        log.log(4, {"reward/mean": 0.99})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["reward/mean"] == 0.99
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3]


def test_fresh_run_starts_empty(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"a": 1.0})
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"a": 2.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 2.0}]


def test_missing_wandb_is_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"run.wandb=true needs the wandb package"):
        MetricsLogger(tmp_path, wandb=True)


def test_format_postfix_and_progress():
    text = format_postfix(
        {
            "loss": 0.1234,
            "reward/mean": torch.tensor(0.5),
            "kl/k3": 0.00312,
            "response/length_mean": 41.5,
            "x": 1,
        }
    )
    assert text == "reward=0.5 kl=0.00312 len=41.5 loss=0.1234"
    assert format_postfix({}) == ""
    # bookkeeping kl keys are skipped in favour of the estimator value
    assert format_postfix({"kl/coef": 0.05, "kl/ref_logratio_sum": 9.0, "kl/k3": 0.002}) == "kl=0.002"
    out = io.StringIO()
    bar = progress(10, "rl", initial=3, disable=False, file=out)
    bar.update(2)
    bar.set_postfix_str(text)
    bar.close()
    assert bar.n == 5
    assert "rl" in out.getvalue() and "5/10" in out.getvalue() and "reward=0.5" in out.getvalue()


def test_tensorboard_mirror_or_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"run.tensorboard=true needs the tensorboard package"):
            MetricsLogger(tmp_path, tensorboard=True)
        return
    with MetricsLogger(tmp_path, tensorboard=True) as log:
        log.log(1, {"reward/mean": 0.5})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
