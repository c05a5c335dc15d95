"""The `backend` / `ray:` settings of `posttrain rl`: where the roles run.

`backend: process` (the default) keeps every role in the calling process. `backend: ray`
places the roles as Ray actors (train/rl/ray_backend.py); the controller is the same
code. Ray is an optional dependency (`pip install posttrain[ray]`), imported only when
`backend: ray` runs, so nothing here imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from posttrain.errors import ConfigError
from posttrain.train.config.checks import setting

# The roles placed as actors; each may be given its own resources under ray.roles.<name>.
RAY_ROLES = ("generator", "policy", "critic", "reference", "teacher", "rewards")
# Ray's placement group strategies (ray.util.placement_group), for ray.placement / rollout_placement.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayRoleResources:
    """Resources one role's actor asks Ray for."""

    num_cpus: float = setting(1.0, "Logical CPUs reserved for the actor (fractions allowed).")
    num_gpus: float | None = setting(
        None,
        "GPUs reserved for the actor; null = 1 for the model roles when model.device is cuda, "
        "else 0 (the rewards actor never gets one by default).",
    )


@dataclass
class RaySection:
    """Ray placement of the RL roles (used only with `backend: ray`)."""

    address: str | None = setting(
        None,
        "Address of a running Ray cluster to join (e.g. ray://host:10001 or auto); null = start a "
        "local Ray instance for this run and shut it down at the end.",
    )
    num_cpus: int | None = setting(
        None,
        "Logical CPUs of the local instance this run starts; null = the sum of the roles' "
        "num_cpus (so the roles always fit). Not allowed with an address.",
    )
    num_gpus: int | None = setting(
        None,
        "GPUs of the local instance this run starts; null = what Ray detects. Not allowed with an address.",
    )
    timeout_s: float = setting(
        1800.0,
        "Deadline of every call to a role's actor: a call that has not returned by then stops "
        "the run with an error naming the role, the method and the seconds waited.",
    )
    learners: int = setting(
        1,
        "Data-parallel width of the learners: N > 1 makes the policy learner (and the critic "
        "learner) a group of N actors, one torch.distributed process group each, FSDP2-sharded "
        "as `--nproc N` ranks are (train/rl/ray_group.py); ray.roles.policy / critic give each "
        "member's resources.",
    )
    rollout_workers: int = setting(
        1,
        "Rollout worker actors, each with its own copy of the policy synced to the same weights; a "
        "round's shards are generated on them concurrently (rollout.shards = 0 means one shard per "
        "worker; a set rollout.shards must be a multiple of this). Each asks for ray.roles.generator.",
    )
    placement: str = setting(
        "PACK",
        "Placement group strategy of a learner group (ray.learners > 1): its N members are reserved "
        "together in one Ray placement group of N bundles (each bundle = ray.roles.policy / critic), so "
        "the group starts whole or not at all (no member waits for the last GPU). PACK = as few nodes as "
        "possible, SPREAD = as many as possible, STRICT_PACK = one node, STRICT_SPREAD = one node each. "
        "A group not placed within ray.timeout_s stops the run.",
    )
    rollout_placement: str | None = setting(
        None,
        "Placement group strategy of the rollout workers (ray.rollout_workers > 1), one bundle each "
        "(ray.roles.generator); null = ray.placement. Separate so that a STRICT_PACK learner group "
        "does not force every rollout worker onto one node too.",
    )
    max_restarts: int = setting(
        3,
        "Restarts allowed per role (each rollout worker, the rewards actor, the reference and teacher "
        "scorers) after its actor dies: a new actor is built the same way, brought back to the weights "
        "it had, and the failed call is retried. 0 = a dead actor stops the run. Learners are never "
        "restarted (resume from the checkpoint).",
    )
    sync_bucket_mb: float = setting(
        512.0,
        "Weight sync puts the learner's tensors in the object store as buckets of at most this many MB "
        "(state-dict order; a larger tensor gets its own bucket) and each rollout worker loads them one "
        "at a time; 0 = the whole state dict as one object.",
    )
    roles: dict[str, RayRoleResources] = setting(
        dict,
        f"Per-role resources, keyed by role ({', '.join(RAY_ROLES)}): {{num_cpus: float, num_gpus: "
        "float | null}, e.g. {generator: {num_cpus: 2}}; a role left out asks for 1 CPU (and 1 GPU for a "
        "model role when model.device is cuda).",
        factory=True,
    )


def role_resources(section: RaySection, role: str, device: str) -> dict[str, float]:
    """{"num_cpus": .., "num_gpus": ..} for `role`'s actor (defaults resolved)."""
    res = section.roles.get(role) or RayRoleResources()
    gpus = res.num_gpus
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") and role != "rewards" else 0.0
    return {"num_cpus": float(res.num_cpus), "num_gpus": float(gpus)}


def check_ray(cfg) -> None:
    """One-line ConfigError for a bad `backend` / `ray:` setting, or `ray:` settings that
    would do nothing (set while the backend is `process`)."""
    r = cfg.ray
    if cfg.backend not in ("process", "ray"):
        raise ConfigError(f"backend must be process or ray, got {cfg.backend!r}")
    if cfg.backend != "ray":
        changed = [f.name for f in fields(RaySection) if getattr(r, f.name) != getattr(RaySection(), f.name)]
        if changed:
            raise ConfigError(
                f"ray.{changed[0]} is set but backend is {cfg.backend!r}: set backend=ray (or --backend ray)"
            )
        return
    if r.address is not None and (r.num_cpus is not None or r.num_gpus is not None):
        key = "num_cpus" if r.num_cpus is not None else "num_gpus"
        raise ConfigError(
            f"ray.{key} sizes the local instance; with ray.address the cluster's own resources apply"
        )
    for key in ("num_cpus", "num_gpus"):
        value = getattr(r, key)
        if value is not None and value < (1 if key == "num_cpus" else 0):
            raise ConfigError(f"ray.{key} must be >= {1 if key == 'num_cpus' else 0}, got {value}")
    if not (math.isfinite(r.timeout_s) and r.timeout_s > 0):
        raise ConfigError(f"ray.timeout_s must be a positive number of seconds, got {r.timeout_s}")
    if r.learners < 1:
        raise ConfigError(f"ray.learners must be >= 1 (1 = one actor per learner), got {r.learners}")
    if not (isinstance(r.rollout_workers, int) and r.rollout_workers >= 1):
        raise ConfigError(f"ray.rollout_workers must be an integer >= 1, got {r.rollout_workers!r}")
    if cfg.rollout.shards % r.rollout_workers:
        raise ConfigError(
            f"rollout.shards={cfg.rollout.shards} must be 0 or a multiple of ray.rollout_workers ({r.rollout_workers})"
        )
    for key in ("placement", "rollout_placement"):
        value = getattr(r, key)
        if not (value is None and key == "rollout_placement") and value not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"ray.{key} must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {value!r}")
    if not (isinstance(r.max_restarts, int) and r.max_restarts >= 0):
        raise ConfigError(f"ray.max_restarts must be an integer >= 0, got {r.max_restarts!r}")
    if not (math.isfinite(r.sync_bucket_mb) and r.sync_bucket_mb >= 0):
        raise ConfigError(f"ray.sync_bucket_mb must be >= 0 (0 = one object), got {r.sync_bucket_mb}")
    for name, res in r.roles.items():
        if name not in RAY_ROLES:
            raise ConfigError(f"ray.roles.{name}: unknown role; the roles are {', '.join(RAY_ROLES)}")
        if not res.num_cpus >= 0 or (res.num_gpus is not None and not res.num_gpus >= 0):
            raise ConfigError(f"ray.roles.{name}: num_cpus / num_gpus must be >= 0")
    from posttrain.train.rl.ray_placement import check_placement

    check_placement(cfg)
    if r.learners > 1:
        from posttrain.train.rl.ray_group import check_learner_group

        check_learner_group(cfg)
