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


def _same_in_process_and_on_ray(tmp_path, *extra: str, steps: int = 3) -> list[dict]:
    """Train `steps` steps in process and on Ray; assert identical weights and trained rows;
    return the Ray run's trained rows."""
    local = RLTrainer(tiny_config(tmp_path / "local", "grpo", REWARD, *extra, steps=steps))
    local.train()
    build = RayBuild()
    try:
        cfg = tiny_config(tmp_path / "ray", "grpo", REWARD, *extra, "backend=ray", SMALL, steps=steps)
        remote = RLTrainer(cfg, build=build)
        remote.train()
        state = remote.policy.state_dict()
    finally:
        build.shutdown()
    for k, v in local.policy.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert _trained(tmp_path / "local") == _trained(tmp_path / "ray")
    return _trained(tmp_path / "ray")


def test_async_ray_trains_like_async_in_process(tmp_path):
    rows = _same_in_process_and_on_ray(
        tmp_path, "rollout.max_staleness=1", "algo.kl_coef=0.05"
    )  # a reference actor
    versions = {tuple(t["versions"]) for r in rows for t in r["trained"]}
    assert versions == {(0, 0), (1, 1)}  # steps 0, 1 sample v0; step 2 v1


def test_a_killed_rollout_worker_stops_an_async_run_naming_the_role(tmp_path):
    """With no restarts allowed, the rollout thread's error (the generator actor died) reaches
    the trainer as itself."""
    build = RayBuild()
    try:
        trainer = RLTrainer(
            tiny_config(tmp_path, "grpo", REWARD, "backend=ray", SMALL, "rollout.max_staleness=1",
                        "ray.max_restarts=0", steps=3),  # fmt: skip
            build=build,
        )
        ray.kill(build.actors["generator"])
        with pytest.raises(TrainingError, match=r"the generator actor died during generator\.\w+") as e:
            trainer.train()
        assert "\n" not in str(e.value)
    finally:
        build.shutdown()


def test_partial_rollouts_on_ray_train_like_in_process(tmp_path):
    """Segments through the rollout-worker actor: same versions per token, same weights."""
    rows = _same_in_process_and_on_ray(tmp_path, "rollout.max_staleness=1", "rollout.partial_tokens=3")
    assert any(t["versions"][0] < t["versions"][1] for r in rows for t in r["trained"])
