"""`backend: ray` with `ray.learners: N > 1`: a learner as a data-parallel group of N actors.

The policy learner (and the critic learner, when the method has one) becomes N Ray actors
that form one torch.distributed process group (gloo on CPU, nccl when the actors have
GPUs) and each build the learner exactly as a rank of `posttrain rl --nproc N` does: the
policy loaded with run.seed, then sharded with FSDP2 (train/rl/dp.py), so every member
holds 1/N of the parameters, gradients and optimizer state. The controller is unchanged:
it holds one `LearnerGroup` handle per learner, called like the learner itself.

How a call runs. The handle puts the arguments (e.g. the step's whole batch) in Ray's
object store ONCE and calls the same method on every member concurrently; each member
runs it as a `--nproc` rank would (roles/updates.py: rank r takes its share of each
minibatch, losses divided by the global counts, FSDP2 averages gradients; scoring passes
run on the whole batch on every member), and only rank 0's result travels back. Every
method is called on all members, since nearly all are collectives (forward passes of a
sharded model, gathers).

What the driver sees is a one-process learner (`GatheredLearner`): `dp` is None, so the
controller's checkpoint code takes its one-process path; `checkpoint_parts` and
`state_dict` are gathered to rank 0 in the one-process format (weights as a plain model,
optimizer state numbered as one process numbers it), and `load_state_dict` shards a
one-process state into the members, so a checkpoint moves between a Ray learner group,
one process and `--nproc` runs at any width. `weights()` gathers the full weights to rank 0
only, on CPU, which puts them in the object store for the rollout worker.

Placement: the N members are reserved together as one Ray placement group of N bundles
(`ray.placement`, train/rl/ray_placement.py), member i in bundle i, so the group starts whole
or not at all.

Rendezvous: rank 0 picks a free port on its node and reports its address; every member then
joins with torch.distributed's environment variables (MASTER_ADDR / MASTER_PORT / RANK /
WORLD_SIZE / LOCAL_RANK) through `engines.distributed.init_from_env`, the same
initialisation, backend choice and collective timeout as a torchrun rank. LOCAL_RANK is 0:
Ray shows each actor only its own GPUs.

Failures: each call waits at most ray.timeout_s. A member that dies stops the run with one
line naming the role, the rank and the method; another member's error (e.g. its collective
broke: a peer was lost) is held back for at most PEER_GRACE_S while the handle looks for a
member that died, so the line names the cause rather than the symptom. A stall names the ranks that did
not answer. `close()` destroys the process group on every member, then ends the actors
(after a failure it only ends them: a member may be stuck in a collective).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from posttrain.engines import distributed as dist
from posttrain.errors import ConfigError, TrainingError
from posttrain.train.config.ray import role_resources
from posttrain.train.rl import dp as rl_dp
from posttrain.train.rl.ray_backend import RemoteWeights, RoleHost, _seeded
from posttrain.train.rl.ray_pool import MB

log = logging.getLogger(__name__)

# The learners that become groups with ray.learners > 1.
GROUP_ROLES = ("policy", "critic")
# After one member's error (e.g. its collective broke): how long to wait for the others (one
# of them may have died, which Ray notices within about a second, or hung).
PEER_GRACE_S = 30.0
# How long `close()` waits for the members to destroy their process group.
TEARDOWN_S = 30.0


def grouped(cfg, role: str) -> bool:
    """True when `role` runs as a learner group in this config."""
    return cfg.backend == "ray" and cfg.ray.learners > 1 and role in GROUP_ROLES


def check_learner_group(cfg) -> None:
    """One-line ConfigErrors for ray.learners > 1, before any actor or model is built: what
    sharded learners refuse (train/rl/dp.py), and a GPU per member under nccl."""
    rl_dp.check_sharded_learners(cfg, "set ray.learners=1")
    if not cfg.model.device.startswith("cuda"):
        return
    for role in GROUP_ROLES:
        gpus = role_resources(cfg.ray, role, cfg.model.device)["num_gpus"]
        if gpus < 1 or gpus != int(gpus):
            raise ConfigError(
                f"ray.roles.{role}.num_gpus={gpus:g}: with ray.learners > 1 on cuda each learner actor "
                "needs whole GPUs of its own (nccl runs one rank per GPU)"
            )


def total_needs(cfg, needs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-role resources summed over each role's actors (a group asks for N members')."""
    width = {r: cfg.ray.learners if grouped(cfg, r) else 1 for r in needs}
    return {r: {k: v * width[r] for k, v in n.items()} for r, n in needs.items()}


def describe_groups(cfg, roles: list[str]) -> str:
    """The `plan` line's note on learner groups ("" without one)."""
    groups = [r for r in roles if grouped(cfg, r)]
    if not groups:
        return ""
    backend = "nccl" if cfg.model.device.startswith("cuda") else "gloo"
    return (
        f"; learner group: {' and '.join(groups)} as {cfg.ray.learners} actors each "
        f"(torch.distributed {backend}, FSDP2; the resources shown are per actor)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Held:
    """A state_dict() / load_state_dict() holder: the gathered optimizer or scheduler state
    that travels to the driver for CheckpointManager (a live sharded optimizer cannot)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class GatheredLearner:
    """A sharded learner (one member's) presented as a one-process learner; the other
    attributes and methods are the learner's own. Every method is a collective."""

    def __init__(self, learner, name: str):
        self.learner = learner
        self.name = name
        self.dp = None  # the driver's checkpoint code takes its one-process path

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self.learner, attribute)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.learner)))

    def weights(self):
        """The policy's full weights on rank 0 (CPU), {} elsewhere: only rank 0 hands them on."""
        from posttrain.roles import StateDictWeights

        return StateDictWeights(self.learner.version, dist.full_model_state(self.learner.model))

    def checkpoint_parts(self, name: str) -> tuple[dict, dict, dict] | None:
        """What `ModelLearner.checkpoint_parts` gives in one process, gathered on rank 0
        (None elsewhere): a plain model, the optimizer and scheduler state in holders."""
        got = rl_dp.gathered_parts(self.learner, name)
        if got is None:
            return None
        models, optimizers, schedulers = got
        held = [{k: _Held(v.state_dict()) for k, v in objs.items()} for objs in (optimizers, schedulers)]
        return models, held[0], held[1]

    def state_dict(self) -> dict | None:
        """The learner's one-process `state_dict()` on rank 0 (None elsewhere)."""
        got = self.checkpoint_parts(self.name)
        if got is None:
            return None
        (model,), (optimizer,), (scheduler,) = (objs.values() for objs in got)
        return {
            **self.learner.state_dict(),  # the guard, the policy version, ...
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Shard a one-process `state_dict()` (the same on every member) into the learner."""
        from posttrain.train.offline.dp import _ShardedOptimizer

        learner = self.learner
        dist.load_full_model_state(learner.model, state["model"])
        _ShardedOptimizer(learner.dp, learner.optimizer).load_state_dict(state["optimizer"])
        learner.scheduler.load_state_dict(state["scheduler"])
        learner.guard.load_state_dict(state["guard"])
        if "version" in state:
            learner.version = int(state["version"])


def _sharded_learner(cfg, spec, name: str, tokenizer, lengths):
    """Build learner `name` as a `--nproc` rank does (train/rl/setup.build_components):
    seeded, the policy loaded (the critic starts from it), then sharded with FSDP2."""
    from posttrain.roles import CriticLearner, PolicyLearner
    from posttrain.train.rl import setup

    _seeded(cfg)
    model = setup.load_checked_policy(cfg, tokenizer, lengths)
    if name == "policy":
        return PolicyLearner(model, cfg, spec, dp=rl_dp.shard(model, "policy"))
    value_model = setup.critic_model(cfg, model, tokenizer)
    return CriticLearner(value_model, cfg, spec, dp=rl_dp.shard(value_model, "critic"))


class GroupMember(RoleHost):
    """The body of one member's actor: `address` (rank 0), `join` (every member), then the
    RoleHost calls, of which only rank 0 returns a result."""

    def __init__(self):  # the role is built by `join`, once the rendezvous is known
        self.rank = -1

    def address(self) -> tuple[str, int]:
        """(this node's IP, a free port on it): where the other members meet rank 0."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def join(self, master: tuple[str, int], rank: int, world: int, cfg, spec, name: str, tokenizer, lengths):
        """Join the group's process group as `rank` of `world`, then build the sharded learner."""
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0")  # fmt: skip
        dist.init_from_env()
        self.rank = dist.rank()
        self.bucket_bytes = int(cfg.ray.sync_bucket_mb * MB)  # rank 0 puts the weights in buckets
        self.role = GatheredLearner(_sharded_learner(cfg, spec, name, tokenizer, lengths), name)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        out = super().call(method, args, kwargs)
        return out if self.rank == 0 else None

    def weights(self):
        if self.rank == 0:
            return super().weights()
        self.role.weights()  # the gather is a collective
        return None

    def leave(self) -> None:
        """Destroy this member's process group."""
        dist.shutdown()


class LearnerGroup:
    """The driver's handle on a learner group, called like the learner (see the module
    docstring): every call goes to all members; rank 0's result is returned."""

    def __init__(self, ray, cfg, spec, name: str, tokenizer, lengths, members: list[dict[str, Any]]):
        """members: each member's actor options (its resources and its placement group bundle)."""
        object.__setattr__(self, "_ray", ray)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_timeout_s", cfg.ray.timeout_s)
        object.__setattr__(self, "_broken", False)
        world = len(members)
        host = ray.remote(GroupMember)
        object.__setattr__(self, "members", [host.options(**options).remote() for options in members])
        try:
            (master,) = self._wait({0: self.members[0].address.remote()}, "rendezvous").values()
            joins = {r: m.join.remote(master, r, world, cfg, spec, name, tokenizer, lengths)
                     for r, m in enumerate(self.members)}  # fmt: skip
            self._wait(joins, "build")
            methods = self._wait({0: self.members[0].methods.remote()}, "build")[0]
        except BaseException:
            self.close()  # RayBuild never saw this group: end its actors here
            raise
        object.__setattr__(self, "_methods", set(methods))

    def _wait(self, refs: dict[int, Any], method: str) -> dict[int, Any]:
        """{rank: result} of each member's call, or a one-line TrainingError (a role's own
        error is raised as itself, as in process).

        A member's error is held back for at most PEER_GRACE_S while the others answer: a
        member that died is then named (the survivors' errors are only its symptoms), and
        an error every member raises alike (the bad-step guard's) arrives from all of them.
        """
        ray, t0 = self._ray, time.perf_counter()
        pending = {ref: rank for rank, ref in refs.items()}
        results: dict[int, Any] = {}
        failed: tuple[int, Exception, float] | None = None  # (rank, error, when) of the first error
        while pending:
            now = time.perf_counter()
            left = t0 + self._timeout_s - now
            if failed is not None:
                left = min(left, failed[2] + PEER_GRACE_S - now)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, left))
            if not ready:
                break
            rank = pending.pop(ready[0])
            try:
                results[rank] = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self._fail(f"the {self._name} learner rank {rank} of {len(self.members)} died during "
                           f"{self._name}.{method} after {time.perf_counter() - t0:.1f} s ({_first(e)})")  # fmt: skip
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                cause = cause if isinstance(cause, Exception) else e.as_instanceof_cause()
                failed = failed or (rank, cause, time.perf_counter())
        if not pending and failed is None:
            return results
        for ref in pending:
            ray.cancel(ref, force=False)
        silent = ", ".join(str(r) for r in sorted(pending.values())) or "none"
        if failed is not None and dist.is_comm_error(failed[1]):
            self._fail(f"{self._name} learner rank {failed[0]} of {len(self.members)} lost its peers during "
                       f"{self._name}.{method} ({_first(failed[1])}); ranks that did not answer: {silent}")  # fmt: skip
        if failed is not None:
            object.__setattr__(self, "_broken", True)
            raise failed[1] from None
        self._fail(f"{self._name}.{method} stalled on learner rank(s) {silent} of {len(self.members)}: no result "
                   f"after {time.perf_counter() - t0:.0f} s (ray.timeout_s={self._timeout_s:g})")  # fmt: skip

    def _fail(self, message: str):
        object.__setattr__(self, "_broken", True)
        raise TrainingError(f"ray backend: {message}")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._methods:  # a plain attribute: rank 0's copy
            return self._wait({0: self.members[0].get.remote(name)}, name)[0]
        if name == "weights":
            return self._weights

        def remote(*args, **kwargs):
            args_ref, kwargs_ref = self._ray.put(args), self._ray.put(kwargs)  # once, for all members
            refs = {r: m.call.remote(name, args_ref, kwargs_ref) for r, m in enumerate(self.members)}
            return self._wait(refs, name)[0]

        return remote

    def _weights(self) -> RemoteWeights:
        """The policy's weights, gathered by all members and put in the object store by rank 0."""
        refs = {r: m.weights.remote() for r, m in enumerate(self.members)}
        version, buckets = self._wait(refs, "weights")[0]
        return RemoteWeights(version, buckets)

    def __setattr__(self, name: str, value):
        raise AttributeError(
            f"ray backend: the controller set {name!r} on the remote {self._name} learner group"
        )

    def close(self) -> None:
        """Destroy the process group on every member (unless a call failed: a member may be
        stuck in a collective), then end the actors."""
        ray = self._ray
        if not self._broken:
            refs = [m.leave.remote() for m in self.members]
            _, late = ray.wait(refs, num_returns=len(refs), timeout=TEARDOWN_S)
            if late:
                log.warning("ray backend: %d of %d %s learner actors did not destroy their process group "
                            "within %g s; ending them anyway", len(late), len(refs), self._name, TEARDOWN_S)  # fmt: skip
        for member in self.members:
            ray.kill(member)


def _first(exc: BaseException) -> str:
    """'Type: first line of the message' (160 characters at most)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
