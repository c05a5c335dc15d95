"""Asynchronous RL (rollout.max_staleness) on `backend: ray`: the rollout thread drives the
rollout-worker and rewards actors while the policy actor trains.

The schedule is deterministic (collect(s) samples with exactly version max(0, s - k)), so
an asynchronous Ray run trains bit-identically to the asynchronous in-process run.
"""

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

from posttrain.errors import TrainingError
from posttrain.train.rl.controller import RLTrainer
from rl_common import cli_resume_matches_uninterrupted, tiny_config

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


def _same_in_process_and_on_ray(tmp_path, *extra: str, steps: int = 3, before_train=None) -> list[dict]:
    """Train `steps` steps in process and on Ray; assert identical weights and trained rows;
    return the Ray run's trained rows. before_train(build) runs once the Ray roles exist."""
    local = RLTrainer(tiny_config(tmp_path / "local", "grpo", REWARD, *extra, steps=steps))
    local.train()
    build = RayBuild()
    try:
        cfg = tiny_config(tmp_path / "ray", "grpo", REWARD, *extra, "backend=ray", SMALL, steps=steps)
        remote = RLTrainer(cfg, build=build)
        if before_train is not None:
            before_train(build)
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
            tiny_config(
                tmp_path,
                "grpo",
                REWARD,
                "backend=ray",
                SMALL,
                "rollout.max_staleness=1",
                "ray.max_restarts=0",
                steps=3,
            ),  # fmt: skip
            build=build,
        )
        ray.kill(build.actors["generator"])
        with pytest.raises(TrainingError, match=r"the generator actor died during generator\.\w+") as e:
            trainer.train()
        assert "\n" not in str(e.value)
    finally:
        build.shutdown()


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_partial_rollouts_on_ray_train_like_in_process(tmp_path):
    """Segments through the rollout-worker actor: same versions per token, same weights."""
    rows = _same_in_process_and_on_ray(tmp_path, "rollout.max_staleness=1", "rollout.partial_tokens=3")
    assert any(t["versions"][0] < t["versions"][1] for r in rows for t in r["trained"])


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def test_a_rollout_worker_killed_in_an_async_run_is_restarted_and_training_is_unchanged(tmp_path):
    """SIGKILL to the rollout worker's process before the first step: the rollout thread's
    first call to it fails, the worker is rebuilt, replays its last weight sync, and the call
    is retried — the asynchronous Ray run trains exactly as the asynchronous in-process one."""

    def kill_the_rollout_worker(build):
        os.kill(build.handles["generator"].pid(), signal.SIGKILL)

    _same_in_process_and_on_ray(
        tmp_path, "rollout.max_staleness=1", "algo.kl_coef=0.05", before_train=kill_the_rollout_worker
    )
    assert sum(r.get("ray/restarts", 0) for r in _rows(tmp_path / "ray" / "metrics.jsonl")) == 1


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from rl_common import cli_resume_matches_uninterrupted, tiny_config
from posttrain.train.rl.controller import run_rl
run_rl(tiny_config(Path({run!r}), "grpo", *{extra!r}, "backend=ray", "run.save_every=1", "run.resume=true", steps=5))
"""


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_kill_9_of_an_async_ray_run_then_cli_resume_is_exact(tmp_path):
    """The whole asynchronous Ray run (driver and, with it, its local Ray instance) is killed
    with SIGKILL while step 3 or 4 of 5 runs; `posttrain rl --run.resume true` on the config it
    wrote completes it: the same final weights and trained rows as an uninterrupted
    asynchronous run (in process: the schedule is the same), and each prompt trained exactly
    as often as 5 steps x 4 prompts over 8 prompts give (2 or 3 times)."""
    extra = ["data.n_train=8", "rollout.max_staleness=2", REWARD, SMALL, "ray.num_cpus=2"]
    ref = RLTrainer(tiny_config(tmp_path / "ref", "grpo", *extra[:3], "run.save_every=1", steps=5))
    ref.train()

    env = dict(os.environ, OMP_NUM_THREADS="1", POSTTRAIN_TEST_THREADS="1", RAY_ADDRESS="")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    code = KILL_SCRIPT.format(tests=str(TESTS), run=str(run), extra=extra)
    # Its own process group: the driver and the local Ray instance it starts (raylet, GCS,
    # agents, actors) are killed together, as `kill -9 -<pgid>` kills a whole run.
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    n_rows, give_up = 2 + int(time.time()) % 2, time.time() + 300
    while len([r for r in _rows(run / "metrics.jsonl") if "time/step_s" in r]) < n_rows:
        if proc.poll() is not None or time.time() > give_up:
            pytest.fail(f"the run ended or hung before {n_rows} steps: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cli_resume_matches_uninterrupted(tmp_path / "ref", run, env)
