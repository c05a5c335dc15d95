"""`backend: ray` placement groups (`ray.placement`, `ray.rollout_placement`;
train/rl/ray_placement.py): a learner group's members and the rollout workers are each
reserved as one placement group, member i in bundle i; a group that cannot be placed stops
the run with one line and leaves nothing behind.

That members really run in their bundles, that training is unchanged, and that a restarted
rollout worker goes back into its bundle are checked inside the runs of
test_rl_ray_group.py and test_rl_ray_pool.py (with `bundle_of` and `all_removed` below);
this module holds the refusals, the unplaceable groups and the plan line.
"""

from __future__ import annotations

import re

import pytest

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.rl.controller import RLTrainer
from ray_common import local_ray_instance
from rl_common import tiny_config

ray = pytest.importorskip("ray")

from posttrain.train.rl.ray_backend import RayBuild, describe_placement  # noqa: E402

REWARD = "rewards=[{name: 'rl_common:digit_fraction', weight: 1.0}]"
ROLES = ("generator", "policy", "critic", "reference", "rewards")
SMALL = "ray.roles={" + ", ".join(f"{r}: {{num_cpus: 0.25}}" for r in ROLES) + "}"


def bundle_of(actor) -> tuple[str | None, list[int]]:
    """(id of the placement group `actor` runs in, the indices of the bundles whose resources
    it holds), asked of the actor itself: Ray names a bundle's resources
    `bundle_group_<index>_<group id>` in the resources assigned to the worker."""

    def where(_host):
        import ray

        held = ray._private.worker.global_worker.core_worker.resource_ids()
        indices = sorted({int(m.group(1)) for k in held if (m := re.match(r"bundle_group_(\d+)_", k))})
        return ray.get_runtime_context().get_placement_group_id(), indices

    return ray.get(actor.__ray_call__.remote(where), timeout=120)


def all_removed(group_ids) -> bool:
    """True when Ray's placement group table shows every one of `group_ids` REMOVED."""
    table = ray.util.placement_group_table()
    return all(table[g]["state"] == "REMOVED" for g in group_ids)


@pytest.fixture(scope="module")
def local_ray():
    """The module's local Ray instance (2 CPUs, one node), for the tests that need it."""
    yield from local_ray_instance(ray)


def test_placement_needs_the_ray_backend_and_a_single_learner_with_no_resources_is_fine(tmp_path):
    from posttrain.train.config.rl import validate

    with pytest.raises(ConfigError, match=r"^ray\.placement is set but backend is 'process'"):
        RLTrainer(tiny_config(tmp_path, "grpo", "ray.placement=SPREAD"))
    # One actor per role: no placement group, so a role asking for nothing is not refused.
    validate(tiny_config(tmp_path, "grpo", "backend=ray", "ray.roles={policy: {num_cpus: 0}}"))


def test_the_plan_line_names_each_placement_group(tmp_path):
    from posttrain.train.config.rl import validate

    cfg = tiny_config(tmp_path, "ppo", "backend=ray", "ray.learners=2", "ray.rollout_workers=3",
                      "ray.rollout_placement=SPREAD", "ray.roles={policy: {num_cpus: 2, num_gpus: 0}}")  # fmt: skip
    line = describe_placement(cfg, validate(cfg))
    assert line.endswith(
        "; placement groups: rollout workers 3 × {CPU: 1} SPREAD, policy learners 2 × {CPU: 2} PACK, "
        "critic learners 2 × {CPU: 1} PACK"
    ), line
    single = tiny_config(tmp_path, "grpo", "backend=ray")
    assert "placement group" not in describe_placement(single, validate(single))


@pytest.mark.parametrize(
    "extra, group, hint",
    [
        (["ray.learners=2", "ray.placement=STRICT_SPREAD"],
         r"policy learners \(2 bundles of \{CPU: 0\.25\}, STRICT_SPREAD\)", "lower ray.learners, change ray.placement or ray.roles.policy"),
        (["ray.rollout_workers=2", "ray.placement=STRICT_SPREAD"],  # rollout_placement null: ray.placement
         r"rollout workers \(2 bundles of \{CPU: 0\.25\}, STRICT_SPREAD\)",
         "lower ray.rollout_workers, change ray.rollout_placement (or ray.placement) or ray.roles.generator"),
    ],
)  # fmt: skip
def test_a_group_that_cannot_be_placed_stops_the_run_in_one_line_and_is_removed(
    tmp_path, local_ray, extra, group, hint
):
    """STRICT_SPREAD wants one node per bundle; the local instance is one node: never placed.
    After ray.timeout_s (3 s here) the run stops before any actor started, naming the group,
    its bundles, the strategy and the cluster, and every placement group is removed."""
    before = set(ray.util.placement_group_table())
    build = RayBuild()
    try:
        with pytest.raises(TrainingError) as e:
            RLTrainer(tiny_config(tmp_path, "grpo", REWARD, "backend=ray", SMALL, "ray.timeout_s=3", *extra),
                      build=build)  # fmt: skip
        assert build.handles == {} and build.groups == {}  # no actor was started
    finally:
        build.shutdown()
    assert re.match(
        rf"^ray: the placement group of the {group} could not be placed within 3 s \(Ray reports [A-Z_]+\); "
        rf"the cluster has 1 node\(s\) with 2 CPU, 0 GPU: {re.escape(hint)}$",
        str(e.value),
    ), e.value
    made = set(ray.util.placement_group_table()) - before
    assert len(made) == 1 and all_removed(made)


def test_a_bundle_is_one_actors_resources_without_the_zero_entries():
    from posttrain.train.rl.ray_placement import bundle

    assert bundle({"num_cpus": 1.0, "num_gpus": 0.0}) == {"CPU": 1.0}
    assert bundle({"num_cpus": 0.0, "num_gpus": 1.0}) == {"GPU": 1.0}
    assert bundle({"num_cpus": 2.0, "num_gpus": 0.5}) == {"CPU": 2.0, "GPU": 0.5}
