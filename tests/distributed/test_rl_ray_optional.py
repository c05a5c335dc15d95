"""Ray is optional: without it installed, in-process `posttrain rl` is unchanged and
`--backend ray` is a one-line error saying how to install it (runs with or without ray:
the import is made to fail here)."""

from __future__ import annotations

import sys

from posttrain.cli import main
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config


def test_without_ray_in_process_rl_runs_and_backend_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    metrics = RLTrainer(tiny_config(tmp_path / "local", "grpo", steps=1)).step()
    assert metrics["sync/bytes"] == 0 and metrics["time/weight_sync_s"] >= 0  # the shared module: no copy
    args = ["rl", "--backend", "ray", "--model.preset=tiny", f"--run.output_dir={tmp_path / 'ray'}",
            "--data.task=arithmetic", "--data.n_train=8", "--rollout.prompts_per_step=2", "--steps=1"]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert err == "error: backend: ray needs Ray, which is not installed: pip install posttrain[ray]"
    assert not (tmp_path / "ray" / "metrics.jsonl").exists()
