"""`backend: ray`: placement groups for the roles that run as several actors.

A learner group (`ray.learners: N > 1`, train/rl/ray_group.py) is one torch.distributed
process group across N actors: a member that starts while another waits for resources sits
in the rendezvous until its collective timeout, holding its CPUs / GPUs. So the N members are
gang-scheduled: the role gets one Ray placement group of N bundles, bundle i holding member
i's resources (`ray.roles.<role>` as {"CPU": c, "GPU": g}, zero entries left out), which Ray
reserves atomically — all N bundles or none — with the `ray.placement` strategy (PACK by
default: as few nodes as possible, so the collectives stay inside a node where they can).
The policy learners and the critic learners get one group each. The rollout workers
(`ray.rollout_workers: N > 1`) get one too, with `ray.rollout_placement` (null = the same
strategy): they never talk to each other, so a user may spread them while packing the
learners.

Every placement group of the run is created before any actor starts, and all of them are
waited for together for at most `ray.timeout_s`; past that they are removed and the run stops
with one line naming the role, its bundles, the strategy, what Ray reports, and the cluster's
nodes. Member i is then scheduled into bundle i (`PlacementGroupSchedulingStrategy`,
`placement_group_bundle_index=i`); a restarted rollout worker is re-created in the bundle of
the one it replaces (the dead actor is killed first, so the bundle has room). Child tasks are
not captured into the group: a bundle is exactly one member's resources, so a captured task
would wait for room that never comes. `Placement.remove()` (RayBuild.shutdown, and any
failure while building) removes the groups, which also ends any actor still in one.
Single actors are placed by Ray's default scheduler, as before.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.config.ray import role_resources

# The roles that become several actors, and what the error line calls them.
GANG_NAMES = {"policy": "policy learners", "critic": "critic learners", "generator": "rollout workers"}


def gangs(cfg, roles: list[str]) -> dict[str, int]:
    """role -> its number of actors, for the roles of this run that get a placement group."""
    r = cfg.ray
    width = {"policy": r.learners, "critic": r.learners, "generator": r.rollout_workers}
    return {role: width[role] for role in roles if width.get(role, 1) > 1}


def check_placement(cfg) -> None:
    """One-line ConfigErrors, before anything is built: a strategy set for no placement group
    (it would do nothing), a role whose actors would be reserved bundles of nothing (Ray
    refuses a bundle without resources)."""
    r = cfg.ray
    roles = ["policy", "generator"] + (["critic"] if cfg.algo.pieces().critic else [])
    placed = gangs(cfg, roles)
    if r.rollout_placement is not None and "generator" not in placed:
        raise ConfigError(
            "ray.rollout_placement is set but there is one rollout worker: set ray.rollout_workers > 1"
        )
    uses_placement = "policy" in placed or ("generator" in placed and r.rollout_placement is None)
    if r.placement != type(r)().placement and not uses_placement:
        raise ConfigError(
            "ray.placement is set but no role it places runs as several actors: set ray.learners > 1 "
            "(or ray.rollout_workers > 1 with ray.rollout_placement null)"
        )
    for role, n in placed.items():
        if not any(role_resources(cfg.ray, role, cfg.model.device).values()):
            key = "rollout_placement" if role == "generator" else "placement"
            raise ConfigError(
                f"ray.roles.{role} asks for no CPU and no GPU, but its {n} actors are each reserved a bundle "
                f"of a placement group (ray.{key}), which must hold some resource: give it num_cpus > 0"
            )


def strategy(cfg, role: str) -> str:
    """The placement strategy of `role`'s group."""
    r = cfg.ray
    return (r.rollout_placement or r.placement) if role == "generator" else r.placement


def bundle(resources: dict[str, float]) -> dict[str, float]:
    """One actor's {"num_cpus", "num_gpus"} as a placement group bundle (zero entries left out)."""
    return {k: v for k, v in (("CPU", resources["num_cpus"]), ("GPU", resources["num_gpus"])) if v}


def _show(b: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"


def describe(cfg, needs: dict[str, dict[str, float]]) -> str:
    """The `plan` line's note on placement groups ("" without one); needs: role -> one actor's resources."""
    parts = [
        f"{GANG_NAMES[role]} {n} × {_show(bundle(needs[role]))} {strategy(cfg, role)}"
        for role, n in gangs(cfg, list(needs)).items()
    ]
    return f"; placement groups: {', '.join(parts)}" if parts else ""


def _hint(role: str) -> str:
    if role == "generator":
        return "lower ray.rollout_workers, change ray.rollout_placement (or ray.placement) or ray.roles.generator"
    return f"lower ray.learners, change ray.placement or ray.roles.{role}"


def _cluster(ray) -> str:
    """'1 node(s) with 2 CPU, 0 GPU' (alike nodes counted together)."""
    nodes = Counter(
        (n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    )
    return (
        " and ".join(f"{k} node(s) with {c:g} CPU, {g:g} GPU" for (c, g), k in sorted(nodes.items()))
        or "no node"
    )


class Placement:
    """The run's placement groups: `reserve` them, `options(role, i)` for member i's actor, `remove`."""

    def __init__(self, ray):
        self.ray = ray
        self.groups: dict[str, Any] = {}  # role -> its PlacementGroup

    def reserve(self, cfg, needs: dict[str, dict[str, float]]) -> None:
        """Create a placement group for every role of `gangs` (needs: role -> one actor's
        resources, for every role of the run) and wait until all are placed, at most
        ray.timeout_s; else remove them and raise a one-line TrainingError."""
        from ray.util import placement_group

        shapes = {
            role: (n, bundle(needs[role]), strategy(cfg, role)) for role, n in gangs(cfg, list(needs)).items()
        }
        for role, (n, b, how) in shapes.items():
            self.groups[role] = placement_group([dict(b) for _ in range(n)], strategy=how)
        if not self.groups:
            return
        refs = {pg.ready(): role for role, pg in self.groups.items()}
        timeout = cfg.ray.timeout_s
        _, late = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if not late:
            return
        role = refs[late[0]]
        n, b, how = shapes[role]
        state = self._state(self.groups[role])
        self.remove()
        raise TrainingError(
            f"ray: the placement group of the {GANG_NAMES[role]} ({n} bundles of {_show(b)}, {how}) could not "
            f"be placed within {timeout:g} s{state}; the cluster has {_cluster(self.ray)}: {_hint(role)}"
        )

    @staticmethod
    def _state(pg) -> str:
        """' (Ray reports INFEASIBLE)': the group's scheduling state, when Ray gives one."""
        from ray.util import placement_group_table

        state = placement_group_table(pg).get("stats", {}).get("scheduling_state")
        return f" (Ray reports {state})" if state else ""

    def options(self, role: str, index: int) -> dict[str, Any]:
        """Extra actor options of member `index` of `role`: its bundle ({} for a single actor)."""
        if role not in self.groups:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.groups[role],
                placement_group_bundle_index=index,
                placement_group_capture_child_tasks=False,
            )
        }

    def remove(self) -> None:
        """Remove every placement group (ending any actor still in one)."""
        from ray.util import remove_placement_group

        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups.clear()
