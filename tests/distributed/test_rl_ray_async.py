"""Asynchronous RL (rollout.max_staleness) on `backend: ray`: the rollout thread drives the
rollout-worker and rewards actors while the policy actor trains.

The schedule is deterministic (collect(s) samples with exactly version max(0, s - k)), so
an asynchronous Ray run trains bit-identically to the asynchronous in-process run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.errors import TrainingError
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config

ray = pytest.importorskip("ray")

from posttrain.train.rl.ray_backend import RayBuild  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
REWARD = "rewards=[{name: 'rl_common:digit_fraction', weight: 1.0}]"
ROLES = ("generator", "policy", "reference", "rewards")
SMALL = "ray.roles={" + ", ".join(f"{r}: {{num_cpus: 0.25}}" for r in ROLES) + "}"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})  # fmt: skip
    yield
    ray.shutdown()


def _trained(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "trained" in r]


def test_async_ray_trains_like_async_in_process(tmp_path):
    extra = (REWARD, "rollout.max_staleness=1", "algo.kl_coef=0.05")  # with a reference actor
    local = RLTrainer(tiny_config(tmp_path / "local", "grpo", *extra, steps=3))
    local.train()
    build = RayBuild()
    try:
        remote = RLTrainer(
            tiny_config(tmp_path / "ray", "grpo", *extra, "backend=ray", SMALL, steps=3), build=build
        )
        remote.train()
        state = remote.policy.state_dict()
    finally:
        build.shutdown()
    for k, v in local.policy.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert _trained(tmp_path / "local") == _trained(tmp_path / "ray")
    versions = [t["versions"] for r in _trained(tmp_path / "ray") for t in r["trained"]]
    assert {tuple(v) for v in versions} == {(0, 0), (1, 1)}  # steps 0, 1 sample v0; step 2 v1


def test_a_killed_rollout_worker_stops_an_async_run_naming_the_role(tmp_path):
    """The rollout thread's error (the generator actor died) reaches the trainer as itself."""
    build = RayBuild()
    try:
        trainer = RLTrainer(
            tiny_config(tmp_path, "grpo", REWARD, "backend=ray", SMALL, "rollout.max_staleness=1", steps=3),
            build=build,
        )
        ray.kill(build.actors["generator"])
        with pytest.raises(TrainingError, match=r"the generator actor died during generator\.\w+") as e:
            trainer.train()
        assert "\n" not in str(e.value)
    finally:
        build.shutdown()
