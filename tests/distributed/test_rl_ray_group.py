"""`backend: ray` with `ray.learners: 2`: the policy (and critic) learner as a group of two
Ray actors on one gloo process group, FSDP2-sharded as `--nproc 2` ranks (train/rl/ray_group.py).

The rollout worker is still one actor sampling the whole batch, so the in-process run with
default settings draws the same samples; the group then reproduces the one-process update
on that batch as two torch.distributed ranks do: weights within test_rl_dp.py's 1e-5
relative tolerance, metrics rows within its float tolerance (except what differs by
nature: timings, `sync/bytes`, the per-micro-batch explained variance). Each group runs in
its own placement group, member i in bundle i, removed at shutdown (train/rl/ray_placement.py).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from test_offline_dp import relative_gap
from test_rl_dp import WEIGHT_RTOL, assert_same_rows

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.rl.controller import RLTrainer, run_rl
from rl_common import tiny_config

ray = pytest.importorskip("ray")

from test_rl_ray import REWARD, SMALL, local_ray  # noqa: E402, F401  (the module's Ray instance)
from test_rl_ray_placement import all_removed, bundle_of  # noqa: E402

from posttrain.train.rl.ray_backend import RayBuild  # noqa: E402

GROUP = [REWARD, "backend=ray", SMALL, "ray.learners=2"]


def _local_shard_numel(member) -> int:
    """Elements of the parameter shards held by one member (its FSDP2 local tensors)."""
    return ray.get(member.__ray_call__.remote(
        lambda host: sum(p.to_local().numel() for p in host.role.learner.model.parameters())
    ), timeout=60)  # fmt: skip


def _compare(tmp_path: Path, method: str, *extra: str, steps: int = 3):
    local = RLTrainer(tiny_config(tmp_path / "local", method, REWARD, *extra, steps=steps))
    rows_local = [local.step() for _ in range(steps)]
    build = RayBuild()
    try:
        remote = RLTrainer(tiny_config(tmp_path / "ray", method, *GROUP, *extra, steps=steps), build=build)
        rows_ray = [remote.step() for _ in range(steps)]
        policy = remote.policy.state_dict()
        critic = remote.critic.state_dict() if remote.critic is not None else None
        assert remote.generator.version == steps  # synced from the group after every update
        # Gang-scheduled: one placement group per learner group (PACK), member i in bundle i.
        groups = {role: pg.id.hex() for role, pg in build.placement.groups.items()}
        assert groups.keys() == build.groups.keys()
        for role, group in build.groups.items():
            assert [bundle_of(m) for m in group.members] == [(groups[role], [0]), (groups[role], [1])]
        for name, learner in (("policy", local.policy), ("critic", local.critic)):
            if learner is None:
                continue
            total = sum(p.numel() for p in learner.model.parameters())
            # Really sharded: each member holds half of the parameters (FSDP2 pads by <= 1 row).
            shards = [_local_shard_numel(m) for m in build.groups[name].members]
            assert sum(shards) >= total and all(abs(n - total / 2) < 0.01 * total for n in shards), shards
        # Teardown: each member destroys its process group (RayBuild.shutdown then ends them).
        left = [m.__ray_call__.remote(lambda host: (host.leave(), torch.distributed.is_initialized())[1])
                for group in build.groups.values() for m in group.members]  # fmt: skip
        assert ray.get(left, timeout=60) == [False] * len(left)
    finally:
        build.shutdown()
    assert all_removed(groups.values())
    rows = (
        [dict(r, step=i) for i, r in enumerate(rows_local)],
        [dict(r, step=i) for i, r in enumerate(rows_ray)],
    )
    assert_same_rows(*rows)
    assert relative_gap(local.policy.model.state_dict(), policy["model"]) < WEIGHT_RTOL
    assert (
        policy["version"] == steps
        and policy["optimizer"]["state"].keys() == local.policy.optimizer.state_dict()["state"].keys()
    )
    if critic is not None:
        assert relative_gap(local.critic.model.state_dict(), critic["model"]) < WEIGHT_RTOL


def test_grpo_with_a_policy_learner_group_of_two_matches_the_in_process_run(tmp_path):
    _compare(tmp_path, "grpo", "algo.kl_coef=0.05")  # with a reference actor beside the group


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_ppo_with_policy_and_critic_learner_groups_matches_the_in_process_run(tmp_path):
    # Two minibatches: old log-probs and values are scoring passes through the sharded models.
    _compare(tmp_path, "ppo", "algo.num_minibatches=2")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_a_group_checkpoint_resumes_in_process_and_final_loads_with_from_pretrained(tmp_path):
    """A 2-learner Ray run stops after step 2 (checkpoints gathered to the driver in the
    one-process format; final/ written by rank 0); one process resumes it to step 3 and
    lands where an uninterrupted in-process run does."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    extra = ["run.save_every=1"]
    run_rl(tiny_config(tmp_path / "local", "grpo", REWARD, *extra, steps=3))
    run_rl(tiny_config(tmp_path / "ray", "grpo", *GROUP, *extra, steps=2))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ray" / "final").state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ray" / "checkpoints" / "step-000002" / "policy")
    assert exported.keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in exported.items())
    shutil.rmtree(tmp_path / "ray" / "final")
    resumed = run_rl(tiny_config(tmp_path / "ray", "grpo", REWARD, *extra, "run.resume=true", steps=3))
    assert resumed["resumed_from"] == 1
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("local", "ray"))
    assert relative_gap(a, b) < WEIGHT_RTOL
    assert_same_rows(_rows(tmp_path / "local"), _rows(tmp_path / "ray"))


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_an_in_process_checkpoint_resumes_in_a_learner_group(tmp_path):
    """The other way: one process writes step 2; a 2-learner group loads it (sharded through
    load_state_dict on both members) and continues to the uninterrupted run's weights."""
    from safetensors.torch import load_file

    extra = ["run.save_every=1"]
    run_rl(tiny_config(tmp_path / "local", "grpo", REWARD, *extra, steps=3))
    run_rl(tiny_config(tmp_path / "ray", "grpo", REWARD, *extra, steps=2))
    shutil.rmtree(tmp_path / "ray" / "final")
    build = RayBuild()
    try:
        trainer = RLTrainer(tiny_config(tmp_path / "ray", "grpo", *GROUP, *extra, "run.resume=true", steps=3),
                            build=build)  # fmt: skip
        assert trainer.train()["resumed_from"] == 1
        assert trainer.generator.version == 3
    finally:
        build.shutdown()
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("local", "ray"))
    assert relative_gap(a, b) < WEIGHT_RTOL
    assert_same_rows(_rows(tmp_path / "local"), _rows(tmp_path / "ray"))


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
@pytest.mark.parametrize("when", ["between steps", "during a step"])
def test_a_killed_learner_member_stops_the_run_with_one_line_naming_role_rank_and_method(tmp_path, when):
    """Member 1 is killed before step 2, or 0.5 s after it begins (wherever that lands: in the
    generator's call, or in a policy call while member 0 waits in a collective): either way
    the run stops with one line naming the role, rank 1 and the policy method it was in or
    was next asked for, not with member 0's broken-collective error."""
    build, killer = RayBuild(), None
    try:
        trainer = RLTrainer(
            tiny_config(tmp_path, "grpo", *GROUP, "algo.update_epochs=4", steps=50), build=build
        )
        trainer.step()
        members = build.groups["policy"].members
        if when == "between steps":
            ray.kill(members[1])
        else:
            killer = threading.Timer(0.5, ray.kill, (members[1],))
            killer.start()
        with pytest.raises(TrainingError) as e:
            for _ in range(49):  # the timer fires during one of these steps
                trainer.step()
    finally:
        if killer is not None:
            killer.join()
        build.shutdown()
    assert "\n" not in str(e.value)
    assert re.match(
        r"^ray backend: the policy learner rank 1 of 2 died during policy\.\w+ after ", str(e.value)
    ), e.value
    with pytest.raises(ray.exceptions.RayActorError):  # the survivor was ended, not left in a collective
        ray.get(members[0].methods.remote(), timeout=60)


@pytest.mark.slow  # waits out a 40 s deadline
def test_a_stalled_learner_member_stops_the_run_after_the_deadline_naming_the_ranks(tmp_path):
    """(First, a role's own error through the group.) Member 1 is kept busy (a long task
    queued on its actor) when step 2 begins: member 0
    waits for it inside the update's first collective, so neither answers; after
    ray.timeout_s one line names the role, the method and both silent ranks."""
    build = RayBuild()
    try:
        trainer = RLTrainer(tiny_config(tmp_path, "grpo", *GROUP, "ray.timeout_s=40"), build=build)
        trainer.step()
        # A role's own error (every member raises it alike) arrives as itself, as in process.
        with pytest.raises(TypeError, match="has no len"):
            trainer.policy.update(None, 1, kl_coef=0.0, kd_coef=0.0)
        busy = build.groups["policy"].members[1].__ray_call__.remote(lambda host: time.sleep(120))
        with pytest.raises(TrainingError) as e:
            trainer.step()
    finally:
        build.shutdown()
    assert re.match(
        r"^ray backend: policy\.update stalled on learner rank\(s\) 0, 1 of 2: no result after 4\d s "
        r"\(ray\.timeout_s=40\)$",
        str(e.value),
    ), e.value
    with pytest.raises(ray.exceptions.RayActorError):  # ended by shutdown, mid-sleep
        ray.get(busy, timeout=60)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["ray.learners=0"], r"^ray\.learners must be >= 1 \(1 = one actor per learner\), got 0$"),
        (["ray.learners=2", "model.lora_r=4"], r"^LoRA \(model\.lora_r > 0\) does not run under torch\.distributed yet; set ray\.learners=1$"),
        (["ray.learners=2", "algo.trust_region=0.01"], r"^algo\.trust_region \(TRPO\) does not run under torch\.distributed yet; set ray\.learners=1$"),
        (["ray.learners=2", "rollout.engine=vllm"], r"^rollout\.engine=vllm does not run under torch\.distributed yet; set ray\.learners=1$"),
        # placement groups (train/rl/ray_placement.py)
        (["ray.placement=pack"], r"^ray\.placement must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD, got 'pack'$"),
        (["ray.placement=SPREAD"], r"^ray\.placement is set but no role it places runs as several actors: set ray\.learners > 1 \(or ray\.rollout_workers > 1 with ray\.rollout_placement null\)$"),
        (["ray.rollout_workers=2", "ray.rollout_placement=PACK", "ray.placement=SPREAD"], r"^ray\.placement is set but no role it places"),
        (["ray.rollout_placement=SPREAD"], r"^ray\.rollout_placement is set but there is one rollout worker: set ray\.rollout_workers > 1$"),
        (["ray.rollout_placement=FAR"], r"^ray\.rollout_placement must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD, got 'FAR'$"),
        (["ray.learners=2", "ray.roles={policy: {num_cpus: 0}}"], r"^ray\.roles\.policy asks for no CPU and no GPU, but its 2 actors are each reserved a bundle of a placement group \(ray\.placement\), which must hold some resource: give it num_cpus > 0$"),
        (["ray.rollout_workers=2", "ray.roles={generator: {num_cpus: 0}}"], r"^ray\.roles\.generator asks for no CPU and no GPU, but its 2 actors .* \(ray\.rollout_placement\)"),
    ],
)  # fmt: skip
def test_learner_group_and_placement_refusals_are_one_line_before_any_actor(tmp_path, extra, words):
    build = RayBuild()
    with pytest.raises(ConfigError, match=words):
        RLTrainer(tiny_config(tmp_path, "grpo", REWARD, "backend=ray", *extra), build=build)
    assert build.ray is None  # refused by validation: no actor was asked for


def test_placement_counts_every_member_of_a_group(tmp_path):
    """The fit check before any actor starts asks for N members' resources: 2 x 1.5 CPUs."""
    with pytest.raises(
        ConfigError,
        match=r"^ray: the roles ask for 6 CPUs \(generator 1, policy 3, reference 1, rewards 1\) but the Ray cluster has 2;",
    ):
        RLTrainer(
            tiny_config(
                tmp_path,
                "grpo",
                REWARD,
                "backend=ray",
                "ray.learners=2",
                "ray.roles={policy: {num_cpus: 1.5}}",
            ),
            build=RayBuild(),
        )


def test_on_cuda_each_member_needs_whole_gpus(tmp_path):
    """nccl runs one rank per GPU: a fractional GPU share is refused (checked here on the
    config itself, since this CPU machine refuses model.device=cuda first)."""
    from posttrain.train.rl.ray_group import check_learner_group

    cfg = tiny_config(tmp_path, "grpo", *GROUP, "ray.roles={policy: {num_gpus: 0.5}}")
    cfg.model.device = "cuda"
    with pytest.raises(
        ConfigError, match=r"^ray\.roles\.policy\.num_gpus=0\.5: with ray\.learners > 1 on cuda"
    ):
        check_learner_group(cfg)
    cfg.ray.roles = {}  # the default: one whole GPU per model-role actor
    check_learner_group(cfg)


def test_learners_need_the_ray_backend_and_the_plan_shows_the_group(tmp_path):
    from posttrain.train.rl.setup import plan

    with pytest.raises(ConfigError, match=r"^ray\.learners is set but backend is 'process'"):
        RLTrainer(tiny_config(tmp_path, "grpo", "ray.learners=2"))
    text = plan(tiny_config(tmp_path, "ppo", *GROUP))
    line = next(x for x in text.splitlines() if "backend: ray" in x)
    assert "policy (0.25 CPU), critic (0.25 CPU)" in line
    assert line.endswith(
        "; learner group: policy and critic as 2 actors each (torch.distributed gloo, FSDP2; "
        "the resources shown are per actor); placement groups: policy learners 2 × {CPU: 0.25} PACK, "
        "critic learners 2 × {CPU: 0.25} PACK"
    ), line
