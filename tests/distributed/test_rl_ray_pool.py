"""`backend: ray` with several rollout workers, restarted actors and bucketed weight sync
(train/rl/ray_backend.py, train/rl/ray_pool.py), on a local Ray instance (2 CPUs).

N rollout workers generate a round's N shards concurrently, each shard with its own derived
seed, so an N-worker Ray run trains bit-identically to the in-process run with
`rollout.shards = N`. A rollout worker or the rewards actor killed with SIGKILL mid-run is
restarted, brought back to its weights, and its call retried: the run then trains exactly
like an uninterrupted one, every prompt trained the configured number of times.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.rl.controller import RLTrainer
from ray_common import local_ray_instance
from rl_common import tiny_config

ray = pytest.importorskip("ray")

from test_rl_ray_placement import all_removed, bundle_of  # noqa: E402

from posttrain.train.rl.ray_backend import RayBuild, describe_placement  # noqa: E402
from posttrain.train.rl.ray_pool import MB, _sum_counters, cut_buckets  # noqa: E402

REWARD = "rewards=[{name: 'rl_common:digit_fraction', weight: 1.0}]"
ROLES = ("generator", "policy", "reference", "rewards")
SMALL = "ray.roles={" + ", ".join(f"{r}: {{num_cpus: 0.25}}" for r in ROLES) + "}"
BACKEND_ONLY = ("time/", "rollout/tokens_per_s", "sync/", "ray/")  # timings and what only Ray reports
STEPS, G = 3, 4  # tiny_config: 4 prompts per step, rollout.group_size 4


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module; the backend uses it and leaves it running."""
    yield from local_ray_instance(ray)


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(BACKEND_ONLY)}


def _in_process(tmp_path: Path, *extra: str):
    """(final policy state dict, untimed rows, trained prompt indices per step) of the
    in-process run with 2 rollout shards."""
    trainer = RLTrainer(
        tiny_config(tmp_path / "local", "grpo", REWARD, "rollout.shards=2", *extra, steps=STEPS)
    )
    rows, prompts = [], []
    for _ in range(STEPS):
        rows.append(_untimed(trainer.step()))
        prompts.append(trainer._last_batch.item_index.tolist())
    return trainer.policy.model.state_dict(), rows, prompts


def _ray_run(tmp_path: Path, *extra: str, before_step=None, after_steps=None):
    """The same run with backend: ray, 2 rollout workers: (final policy state dict, raw rows,
    trained prompt indices per step). before_step(step, build) runs before each step,
    after_steps(build) after the last. Checked on the way: the workers run in one placement
    group, worker i (restarted or not) in bundle i, and the group is removed at shutdown."""
    build = RayBuild()
    try:
        cfg = tiny_config(tmp_path / "ray", "grpo", REWARD, "backend=ray", SMALL, "ray.rollout_workers=2", *extra,
                          steps=STEPS)  # fmt: skip
        trainer = RLTrainer(cfg, build=build)
        rows, prompts = [], []
        for step in range(STEPS):
            if before_step is not None:
                before_step(step, build)
            rows.append(trainer.step())
            prompts.append(trainer._last_batch.item_index.tolist())
        state = trainer.policy.state_dict()["model"]
        assert trainer.generator.version == STEPS
        if after_steps is not None:
            after_steps(build)
        (group,) = [pg.id.hex() for role, pg in build.placement.groups.items() if role == "generator"]
        assert [bundle_of(build.actors[f"generator[{i}]"]) for i in range(2)] == [(group, [0]), (group, [1])]
    finally:
        build.shutdown()
    assert all_removed([group])
    return state, rows, prompts


def _assert_same_training(local, remote):
    (state_a, rows_a, prompts_a), (state_b, rows_b, prompts_b) = local, remote
    assert state_a.keys() == state_b.keys()
    for k, v in state_a.items():
        assert torch.equal(v, state_b[k]), k
    assert rows_a == [_untimed(r) for r in rows_b]
    # The audit: the same prompts, each trained on exactly once per step it was drawn (G samples).
    assert prompts_a == prompts_b
    counts = Counter(i for step in prompts_b for i in step)
    assert len(counts) == STEPS * 4 and set(counts.values()) == {G}


def _model_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _dead(actor) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return True
    return False


def _restart_worker_one(build) -> None:
    """Kill rollout worker 1's actor, then call it: the handle re-creates it (in its bundle)."""
    old = build.actors["generator[1]"]
    ray.kill(old)
    assert any(_dead(old) for _ in range(100))  # Ray has seen it die (the kill is asynchronous)
    build.handles["generator[1]"].pid()
    assert build.actors["generator[1]"] is not old


def test_two_rollout_workers_train_like_the_in_process_run_with_two_shards(tmp_path):
    local = _in_process(tmp_path, "algo.kl_coef=0.05")
    # With a reference actor; worker 1 restarted at the end goes back into bundle 1.
    remote = _ray_run(tmp_path, "algo.kl_coef=0.05", after_steps=_restart_worker_one)
    _assert_same_training(local, remote)
    rows = remote[1]
    # Both workers received the whole state dict at every sync, in one bucket; nothing restarted.
    assert all(r["sync/bytes"] == 2 * _model_bytes(remote[0]) and r["sync/buckets"] == 1 for r in rows)
    assert sum(r["ray/restarts"] for r in rows) == 0


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_a_rollout_worker_killed_mid_run_is_restarted_and_training_is_unchanged(tmp_path, caplog):
    """SIGKILL to rollout worker 1's process from another thread as step 2 starts: the
    worker is rebuilt, brought to the weights of its last sync, the failed call retried."""
    killers = []

    def kill_worker_one(step, build):
        if step == 1:
            pid = build.handles["generator[1]"].pid()
            killers.append(threading.Thread(target=os.kill, args=(pid, signal.SIGKILL)))
            killers[-1].start()

    local = _in_process(tmp_path)
    with caplog.at_level("WARNING", logger="posttrain.train.rl.ray_backend"):
        remote = _ray_run(tmp_path, before_step=kill_worker_one)
    assert len(killers) == 1
    _assert_same_training(local, remote)
    assert sum(r["ray/restarts"] for r in remote[1]) == 1
    (line,) = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
    assert "\n" not in line
    assert line.startswith("ray backend: the generator[1] actor died during generator[1].")
    assert line.endswith("restarting it (restart 1 of ray.max_restarts=3)")


def _killing_reward(marker: Path, on_call: int) -> str:
    return (
        f"rewards=[{{name: 'ray_common:killed_once', options: {{marker: '{marker}', on_call: {on_call}}}}}]"
    )


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_the_rewards_actor_killed_mid_call_is_restarted_and_training_is_unchanged(tmp_path):
    """The reward SIGKILLs the rewards actor inside its 3rd score call (step 2, one call per
    shard): the restarted actor scores the same samples the same way. (In process the same
    reward runs with its marker already made: it never kills.)"""
    (tmp_path / "made").touch()
    local = _in_process(tmp_path, _killing_reward(tmp_path / "made", on_call=3))
    remote = _ray_run(tmp_path, _killing_reward(tmp_path / "killed", on_call=3))
    assert (tmp_path / "killed").exists()
    _assert_same_training(local, remote)
    assert sum(r["ray/restarts"] for r in remote[1]) == 1


def test_max_restarts_0_keeps_the_one_line_error(tmp_path):
    """The first score call kills the rewards actor; the other shard's thread may be the one
    that finds it dead first (in `configured` or `score`): either way one line names it."""
    with pytest.raises(
        TrainingError, match=r"^ray backend: the rewards actor died during rewards\.\w+ after [\d.]+ s \("
    ) as e:
        _ray_run(tmp_path, _killing_reward(tmp_path / "killed", on_call=1), "ray.max_restarts=0")
    assert "\n" not in str(e.value)


def test_a_dead_learner_is_not_restarted(tmp_path):
    def kill_learner(step, build):
        if step == 1:
            ray.kill(build.actors["policy"])

    with pytest.raises(TrainingError, match=r"^ray backend: the policy actor died during policy\.\w+") as e:
        _ray_run(tmp_path, before_step=kill_learner)
    assert "\n" not in str(e.value) and "restarts" not in str(e.value)


def test_cut_buckets_by_hand():
    """float32 tensors of 4, 4, 12 and 4 bytes under an 8-byte bucket: [a b] [c] [d]; the
    12-byte tensor, larger than a bucket, goes alone; 0 = one bucket."""
    t = {"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(3), "d": torch.zeros(1)}
    assert [list(b) for b in cut_buckets(t, 8)] == [["a", "b"], ["c"], ["d"]]
    assert [list(b) for b in cut_buckets(t, 12)] == [["a", "b"], ["c"], ["d"]]
    assert [list(b) for b in cut_buckets(t, 16)] == [["a", "b"], ["c", "d"]]
    assert [list(b) for b in cut_buckets(t, 0)] == [["a", "b", "c", "d"]]


def test_the_pools_counters_add_up_the_workers():
    parts = [{"thinking_cut": 2, "prm": {"steps": 3}}, {"thinking_cut": 5, "prm": {"steps": 1, "cut": 4}}]
    assert _sum_counters(parts) == {"thinking_cut": 7, "prm": {"steps": 4, "cut": 4}}


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_bucketed_weight_sync_trains_like_one_object(tmp_path):
    """A 2 KB bucket cuts the tiny policy into many buckets; the workers load the same weights."""
    local = _in_process(tmp_path)
    remote = _ray_run(tmp_path, "ray.sync_bucket_mb=0.002")
    _assert_same_training(local, remote)
    expected = len(cut_buckets(remote[0], int(0.002 * MB)))
    assert expected > 10
    assert all(r["sync/buckets"] == expected for r in remote[1])
    assert all(r["sync/bytes"] == 2 * _model_bytes(remote[0]) for r in remote[1])


def test_pool_settings_are_checked_before_any_actor_starts(tmp_path):
    ray_cfg = ("backend=ray", SMALL)
    cases = {
        "ray.rollout_workers=0": r"^ray\.rollout_workers must be an integer >= 1, got 0$",
        "ray.max_restarts=-1": r"^ray\.max_restarts must be an integer >= 0, got -1$",
        "ray.sync_bucket_mb=-1": r"^ray\.sync_bucket_mb must be >= 0 \(0 = one object\), got -1",
    }
    for setting, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            RLTrainer(tiny_config(tmp_path, "grpo", *ray_cfg, setting), build=RayBuild())
    with pytest.raises(
        ConfigError, match=r"^rollout\.shards=3 must be 0 or a multiple of ray\.rollout_workers \(2\)$"
    ):
        RLTrainer(
            tiny_config(tmp_path, "grpo", *ray_cfg, "ray.rollout_workers=2", "rollout.shards=3"),
            build=RayBuild(),
        )
    with pytest.raises(ConfigError, match=r"^ray\.rollout_workers is set but backend is 'process'"):
        RLTrainer(tiny_config(tmp_path, "grpo", "ray.rollout_workers=2"))


def test_plan_line_shows_the_rollout_workers(tmp_path):
    from posttrain.train.config.rl import validate

    cfg = tiny_config(tmp_path, "grpo", "backend=ray", "ray.rollout_workers=3", "ray.sync_bucket_mb=64")
    line = describe_placement(cfg, validate(cfg))
    assert "3 × generator (1 CPU)" in line and "weight sync in 64 MB buckets" in line
    assert "up to 3 restarts per rollout / reward / scorer actor" in line
