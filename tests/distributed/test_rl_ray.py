"""`backend: ray`: the RL roles as Ray actors on a local Ray instance (2 CPUs).

The controller is the in-process code over `RemoteRole` handles (train/rl/ray_backend.py),
so a synchronous Ray run must train exactly like the in-process one: every actor seeds
and builds its models in the in-process order, the rollout worker samples from its own
copy of the policy that only `Generator.sync` updates, and only pickled data crosses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.rl.controller import RLTrainer
from ray_common import local_ray_instance
from rl_common import tiny_config, train_digit_teacher

ray = pytest.importorskip("ray")

from posttrain.train.rl.ray_backend import RayBuild  # noqa: E402

# A "module:function" reward: the rewards actor imports it (a registry entry made in this
# process would not exist there).
REWARD = "rewards=[{name: 'rl_common:digit_fraction', weight: 1.0}]"
# Small CPU shares so that every role's actor fits the 2-CPU local instance.
ROLES = ("generator", "policy", "critic", "reference", "teacher", "rewards")
SMALL = "ray.roles={" + ", ".join(f"{r}: {{num_cpus: 0.25}}" for r in ROLES) + "}"
TIMING = ("time/", "rollout/tokens_per_s", "sync/bytes", "sync/buckets", "ray/")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module; the backend uses it and leaves it running."""
    yield from local_ray_instance(ray)


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def _compare(tmp_path, method: str, *extra: str, steps: int = 3):
    local = RLTrainer(tiny_config(tmp_path / "local", method, REWARD, *extra, steps=steps))
    rows_local = [_untimed(local.step()) for _ in range(steps)]
    build = RayBuild()
    try:
        remote = RLTrainer(
            tiny_config(tmp_path / "ray", method, REWARD, "backend=ray", SMALL, *extra, steps=steps),
            build=build,
        )
        raw = [remote.step() for _ in range(steps)]
        state = remote.policy.state_dict()
        critic = remote.critic.state_dict() if remote.critic is not None else None
        assert remote.generator.version == steps  # the rollout worker's weights: the last update's
    finally:
        build.shutdown()
    for k, v in local.policy.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    if critic is not None:
        for k, v in local.critic.model.state_dict().items():
            assert torch.equal(v, critic["model"][k]), k
    assert rows_local == [_untimed(r) for r in raw]
    # The rollout worker received the whole policy state dict at every step.
    assert all(
        r["sync/bytes"] == sum(v.numel() * v.element_size() for v in state["model"].values()) for r in raw
    )
    return rows_local


def test_synchronous_ray_grpo_trains_like_the_in_process_run(tmp_path):
    """The issue's bar: the same weights after 5 steps (with a reference actor)."""
    _compare(tmp_path, "grpo", "algo.kl_coef=0.05", steps=5)


def test_synchronous_ray_ppo_with_a_critic_actor(tmp_path):
    _compare(tmp_path, "ppo", steps=2)


def test_synchronous_ray_kdrl_with_a_teacher_actor(tmp_path):
    teacher = train_digit_teacher(tmp_path / "teacher", steps=5)
    _compare(tmp_path, "kdrl", f"teacher.path={teacher}", steps=2)


def test_synchronous_ray_grpo_with_multi_turn_tool_rollouts(tmp_path):
    """The rollout worker drives the multi-turn generator (tools environment, calculator)
    inside its actor: same samples, tools/* metrics and weights as in process."""
    rows = _compare(tmp_path, "grpo", "env.name=tools", "env.max_turns=2", "env.max_total_tokens=120",
                    "rollout.max_new_tokens=40", steps=2)  # fmt: skip
    assert all(r["tools/turns_mean"] >= 1 and "tools/call_rate" in r for r in rows)


def test_a_killed_rollout_worker_stops_the_run_naming_the_role(tmp_path):
    build = RayBuild()
    try:
        cfg = tiny_config(tmp_path, "grpo", REWARD, "backend=ray", SMALL, "ray.max_restarts=0")
        trainer = RLTrainer(cfg, build=build)
        trainer.step()
        ray.kill(build.actors["generator"])
        with pytest.raises(TrainingError, match=r"the generator actor died during generator\.\w+") as e:
            trainer.step()
        assert "\n" not in str(e.value)
    finally:
        build.shutdown()


def test_a_stalled_call_stops_the_run_after_the_deadline_naming_role_and_method(tmp_path):
    """The rewards actor's score call outlives ray.timeout_s (a reward that sleeps, switched
    on at step 1, under a longer reward_exec.timeout_s): one line names rewards.score."""
    rewards = (
        "rewards=[{name: 'rl_common:digit_fraction'}, {name: 'rl_common:stalled_reward', start_step: 1}]"
    )
    cfg = tiny_config(
        tmp_path, "grpo", rewards, "reward_exec.timeout_s=300", "backend=ray", SMALL, "ray.timeout_s=20"
    )
    build = RayBuild()
    try:
        trainer = RLTrainer(cfg, build=build)
        trainer.step()
        with pytest.raises(
            TrainingError,
            match=r"^ray backend: rewards\.score stalled: no result after 2\d s \(ray\.timeout_s=20\)$",
        ):
            trainer.step()
    finally:
        build.shutdown()


def test_an_error_inside_a_role_reaches_the_driver_as_the_roles_own_error(tmp_path):
    """A reward that always raises: the rewards actor's RewardError arrives as itself, with
    the in-process message, not as Ray's traceback."""
    from posttrain.errors import RewardError

    rewards = "rewards=[{name: 'rl_common:failing_reward'}]"
    with pytest.raises(RewardError) as local:
        RLTrainer(tiny_config(tmp_path / "local", "grpo", rewards)).step()
    build = RayBuild()
    try:
        trainer = RLTrainer(tiny_config(tmp_path / "ray", "grpo", rewards, "backend=ray", SMALL), build=build)
        with pytest.raises(RewardError) as remote:
            trainer.step()
    finally:
        build.shutdown()
    assert str(remote.value) == str(local.value)


def test_ray_settings_need_the_ray_backend(tmp_path):
    with pytest.raises(ConfigError, match=r"ray\.timeout_s is set but backend is 'process'"):
        RLTrainer(tiny_config(tmp_path, "grpo", "ray.timeout_s=5"))
    with pytest.raises(ConfigError, match=r"ray\.roles\.learner: unknown role"):
        RLTrainer(tiny_config(tmp_path, "grpo", "backend=ray", "ray.roles={learner: {num_cpus: 1}}"))
    with pytest.raises(ConfigError, match=r"ray\.num_cpus sizes the local instance; with ray\.address"):
        RLTrainer(tiny_config(tmp_path, "grpo", "backend=ray", "ray.address=auto", "ray.num_cpus=2"))
    # Placement is checked before any actor starts: actors that cannot fit would wait forever.
    with pytest.raises(
        ConfigError,
        match=r"^ray: the roles ask for 11 CPUs \(generator 1, policy 8, reference 1, rewards 1\) but the Ray cluster has 2;",
    ):
        RLTrainer(
            tiny_config(tmp_path, "grpo", "backend=ray", "ray.roles={policy: {num_cpus: 8}}"),
            build=RayBuild(),
        )


def _rows(run_dir: Path) -> list[dict]:
    return [_untimed(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_run_checkpoints_resumes_and_evaluates_like_in_process(tmp_path):
    """`posttrain rl --backend ray` end to end: held-out evaluation through the generator
    actor, checkpoints written from the learner actors' copies, a resume that loads them
    back into fresh actors, and the final export — the same weights and rows as in process."""
    from safetensors.torch import load_file

    from posttrain.train.rl.controller import run_rl

    extra = [REWARD, "data.n_test=4", "eval.n=4", "eval.every=1", "run.save_every=1"]
    run_rl(tiny_config(tmp_path / "local", "grpo", *extra, steps=3))
    ray_cfg = [*extra, "backend=ray", SMALL]
    run_rl(tiny_config(tmp_path / "ray", "grpo", *ray_cfg, steps=2))
    build = RayBuild()
    try:
        resumed = RLTrainer(
            tiny_config(tmp_path / "ray", "grpo", *ray_cfg, "run.resume=true", steps=3), build=build
        )
        assert resumed.train()["resumed_from"] == 1
        assert resumed.generator.version == 3  # the policy version survives the resume
    finally:
        build.shutdown()
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("local", "ray"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_local, rows_ray = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert any("eval/accuracy" in r for r in rows_ray)
    assert rows_local == rows_ray


def _cli(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`posttrain rl --backend ray` on the tiny task in a fresh process (Ray not initialised
    there; the child asserts it is not left initialised): (the finished process, run dir)."""
    out = tmp_path / "run"
    args = ["--model.preset=tiny", f"--run.output_dir={out}", "--data.task=arithmetic", "--data.n_train=8",
            "--data.n_test=4", "--eval.before_after=true", "--eval.n=4", "--rollout.prompts_per_step=2",
            "--rollout.max_new_tokens=8", "--steps=2", *extra]  # fmt: skip
    code = "import ray, sys; from posttrain.cli import main; rc = main(sys.argv[1:]); assert not ray.is_initialized(); sys.exit(rc)"
    done = subprocess.run([sys.executable, "-c", code, "rl", "--backend", "ray", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["steps"] == 2 and "eval/accuracy" in summary["eval_after"]
    assert (out / "final" / "model.safetensors").is_file()
    return done, out


def test_cli_backend_ray_starts_and_stops_its_own_local_instance(tmp_path):
    """With no address the run starts a local instance sized for its roles and stops it."""
    done, _ = _cli(tmp_path)
    assert "Started a local Ray instance" in done.stderr


def test_cli_backend_ray_joins_a_running_cluster_and_leaves_it_running(tmp_path):
    """ray.address: the run places its actors on this module's Ray instance (small CPU
    shares so that they fit its 2 CPUs), then disconnects; the cluster keeps running."""
    address = ray.get_runtime_context().gcs_address
    done, _ = _cli(tmp_path, f"--ray.address={address}", f"--{SMALL}")
    assert "Started a local Ray instance" not in done.stderr
    assert ray.get(ray.remote(lambda: 1).remote(), timeout=60) == 1
