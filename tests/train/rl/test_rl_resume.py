"""Kill -9 mid-run, resume: the following steps equal an uninterrupted run bit for bit (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config

HERE = Path(__file__).parents[2]  # tests/, where rl_common.py lives
STEPS = 8
# Everything that depends on weights, data order and RNG; timings are excluded.
COMPARED = (
    "loss/total",
    "reward/mean",
    "reward/std",
    "adv/mean",
    "adv/std",
    "policy/loss",
    "kl/k3",
    "train/grad_norm",
)

SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from pathlib import Path
from rl_common import tiny_config
from posttrain.train.rl.controller import RLTrainer
cfg = tiny_config(Path({run!r}), {method!r}, "run.save_every=1", "sample_log_every=1", "run.resume=true",
                  "algo.kl_coef=0.05", steps={steps})
RLTrainer(cfg).train()
"""


def _launch(run: Path, method: str) -> subprocess.Popen:
    code = SCRIPT.format(here=str(HERE), run=str(run), method=method, steps=STEPS)
    env = dict(os.environ, OMP_NUM_THREADS="1", POSTTRAIN_TEST_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_kill_and_resume_is_bit_exact(method, tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    _finish(_launch(ref_dir, method))

    proc = _launch(run_dir, method)
    kill_after = 2 + int(time.time()) % 2  # "a random step": 2 or 3 rows written
    deadline = time.time() + 240
    while len(_rows(run_dir / "metrics.jsonl")) < kill_after:
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = CheckpointManager(run_dir).latest()
    assert latest is not None
    resumed_from = CheckpointManager.step_of(latest)
    assert resumed_from < STEPS - 4, "need 5 resumed steps to compare"

    _finish(_launch(run_dir, method))
    ref, got = _rows(ref_dir / "metrics.jsonl"), _rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(STEPS))
    for a, b in zip(ref, got):
        for key in COMPARED:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
    ref_ids = [(r["step"], r["prompt_id"], r["completion"]) for r in _rows(ref_dir / "samples.jsonl")]
    got_ids = [(r["step"], r["prompt_id"], r["completion"]) for r in _rows(run_dir / "samples.jsonl")]
    assert ref_ids == got_ids


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import posttrain.train.common.checkpoint as ckpt_mod

    cfg = tiny_config(tmp_path, "grpo", steps=3)
    trainer = RLTrainer(cfg)
    trainer.step()
    first = trainer.save_checkpoint()
    saved = [p.detach().clone() for p in trainer.policy.model.parameters()]
    trainer.step()
    real = ckpt_mod._save_module
    calls = {"n": 0}

    def crash_midway(*a, **k):
        calls["n"] += 1
        real(*a, **k)  # one file is fully written, then the process "dies"
        raise KeyboardInterrupt("simulated kill during checkpoint write")

    monkeypatch.setattr(ckpt_mod, "_save_module", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(ckpt_mod, "_save_module", real)
    assert CheckpointManager(tmp_path).latest() == first
    fresh = RLTrainer(cfg)
    fresh.load_checkpoint(first)
    assert fresh.step_count == 1
    for a, b in zip(saved, fresh.policy.model.parameters()):
        assert torch.equal(a, b.detach())
