"""`backend: ray`: the roles of the RL loop as Ray actors, driven by the unchanged controller.

The controller (`RLTrainer`, train/rl/controller.py) takes a `build` function that returns
its roles; `RayBuild` returns `RemoteRole` handles instead of the objects. Each handle
exposes the role's methods and turns a call into `ray.get(actor.call.remote(...))` under
the `ray.timeout_s` deadline, so the controller's code is the in-process code: only plain
data crosses (what tests/roles/test_process_boundary.py already proves with a pickling
proxy). What runs where:

  driver (this process): the controller, the tokenizer, the prompts (`PromptSource`),
      the held-out data, the checkpoint files;
  one actor per role: `ray.rollout_workers` rollout workers (each a `Generator` with its
      OWN copy of the policy, synced through `Generator.sync` with the learner's weights
      fetched bucket by bucket from Ray's object store: `RemoteWeights`, train/rl/ray_pool.py;
      together a `GeneratorPool` that generates a round's shards concurrently), the policy
      learner, the critic learner, the reference and teacher scorers, the rewarder. Each
      asks Ray for `ray.roles.<role>` CPUs / GPUs (every rollout worker for the generator's).

Every actor seeds python and torch with run.seed and builds its models in the order the
in-process `build_components` does, so each model starts from the same weights as in
process (the reference and critic replay the policy's initialisation), and a synchronous
Ray run trains bit-identically to the in-process one with `rollout.shards` = the number of
rollout workers (tests/distributed/test_rl_ray.py, test_rl_ray_pool.py).

Faults: a rollout worker, the rewards actor, or the reference / teacher scorer that dies
(RayActorError) is restarted up to `ray.max_restarts` times: a new actor is built the same
way, replays the last weight sync / reference refresh it had received, and the failed call
is retried. Generation and rewards are deterministic for a given seed, so the restarted run
trains bit-identically to an uninterrupted one; each restart logs one warning line and counts
in `ray/restarts`. The learners are never restarted (their state is the training state: a
dead learner stops the run with a one-line error; resume from the checkpoint), and a stalled
call stops the run after `ray.timeout_s` with a one-line error.

With `ray.learners: N > 1` the policy and critic learners are each a group of N actors on
one torch.distributed process group, FSDP2-sharded as `--nproc N` ranks are; `RayBuild`
builds a `LearnerGroup` handle for them instead (train/rl/ray_group.py).
The roles of several actors (a learner group, N rollout workers) are each reserved as one
Ray placement group before any actor starts, each actor in its own bundle
(`ray.placement`, train/rl/ray_placement.py).

With `rollout.max_staleness` the controller's rollout thread (train/rl/async_rollouts.py)
calls the rollout workers and the rewards actor while the policy actor trains. Ray is
imported lazily: without it installed, only `backend: ray` fails, with a one-line error.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from posttrain.algos.spec import RLSpec
from posttrain.errors import ConfigError, TrainingError
from posttrain.train.config.ray import RAY_ROLES, role_resources
from posttrain.train.config.rl import RLConfig
from posttrain.train.rl.ray_placement import Placement
from posttrain.train.rl.ray_placement import describe as describe_placement_groups
from posttrain.train.rl.ray_pool import (
    MB,
    GeneratorPool,
    RemoteWeights,
    RestartCounter,
    cut_buckets,
    sync_by_bucket,
)

log = logging.getLogger(__name__)


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "backend: ray needs Ray, which is not installed: pip install posttrain[ray]"
        ) from None
    return ray


def _seeded(cfg: RLConfig) -> None:
    """Seed this actor's global RNGs as RLTrainer seeds the driver's before building."""
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)


def _role(cfg: RLConfig, spec: RLSpec, name: str, tokenizer, lengths):
    """Build role `name` in the calling actor (see the module docstring for the order)."""
    from posttrain.roles import PolicyLearner, ScoringRole
    from posttrain.train.rl import setup

    if name == "rewards":
        return setup.build_rewarder(cfg)
    _seeded(cfg)
    model = setup.load_checked_policy(cfg, tokenizer, lengths)  # the initial policy, as in process
    if name == "policy":
        return PolicyLearner(model, cfg, spec)
    if name == "generator":
        # Its own copy: it samples from what `sync` loads, never from the learner's module.
        return setup.build_generator(cfg, model, tokenizer)
    if name == "reference":
        return ScoringRole.reference_for(model, cfg.rollout.temperature, copy=False)
    if name == "critic":
        return setup.build_critic(cfg, spec, model, tokenizer)
    if name == "teacher":
        return setup.build_teacher(cfg, model, tokenizer)
    raise ConfigError(f"ray backend: unknown role {name!r}")


class RoleHost:
    """The body of a role's actor: builds the role, then runs the methods asked of it."""

    def __init__(self, cfg: RLConfig, spec: RLSpec, name: str, tokenizer, lengths):
        self.role = _role(cfg, spec, name, tokenizer, lengths)
        self.bucket_bytes = int(cfg.ray.sync_bucket_mb * MB)

    def methods(self) -> list[str]:
        """The role's public methods (what the handle forwards as calls)."""
        return [n for n in dir(self.role) if not n.startswith("_") and callable(getattr(self.role, n))]

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """role.method(*args, **kwargs); the result travels back pickled. A `RemoteWeights`
        argument is fetched here, from the object store, not through the driver: a rollout
        worker with an in-process model loads it bucket by bucket."""
        if (
            method == "sync"
            and args
            and isinstance(args[0], RemoteWeights)
            and getattr(self.role, "model", None) is not None
        ):
            return sync_by_bucket(self.role, args[0])
        args = tuple(a.fetch() if isinstance(a, RemoteWeights) else a for a in args)
        return getattr(self.role, method)(*args, **kwargs)

    def weights(self) -> tuple[int, list]:
        """(policy version, [object refs of its buckets]): the learner's weights put in the
        object store once, in buckets of ray.sync_bucket_mb, for the rollout workers and the
        reference to fetch (the list keeps Ray from resolving the refs on the way to the driver)."""
        import ray

        w = self.role.weights()
        # ray.put serialises at once: each bucket is a snapshot of the tensors as they are now.
        return w.version, [ray.put(b) for b in cut_buckets(w.state_dict(), self.bucket_bytes)]

    def get(self, attribute: str) -> Any:
        """A copy of a plain attribute of the role (e.g. a learner's `guard`)."""
        return getattr(self.role, attribute)

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()


class _ActorDied(TrainingError):
    """The actor behind a call died (its one-line message names role, method and seconds)."""


class RemoteRole:
    """A role in a Ray actor, called like the object itself (synchronously).

    Methods are forwarded as `actor.call`; a plain attribute read returns a copy. Every
    call waits at most `timeout_s`: a stalled call raises a one-line TrainingError naming the
    role, the method and the seconds waited. An actor that died is restarted up to
    `max_restarts` times (`spawn` builds a new one the same way, then the last call of each
    method in `replayed`, e.g. the generator's `sync`, is replayed on it) and the failed
    call is retried; past that, or with max_restarts 0, a one-line TrainingError says it died.
    """

    def __init__(self, ray, spawn: Callable[[], Any], name: str, timeout_s: float, *,
                 max_restarts: int = 0, restarts: RestartCounter | None = None, replayed: tuple[str, ...] = ()):  # fmt: skip
        for key, value in (("_ray", ray), ("_spawn", spawn), ("_name", name), ("_timeout_s", timeout_s),
                           ("_max_restarts", max_restarts), ("_restarts", restarts or RestartCounter()),
                           ("_replayed", replayed), ("_last", {}), ("_lock", threading.Lock()),
                           ("_restarted", 0), ("_actor", spawn())):  # fmt: skip
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_methods", set(self._call("build", lambda actor: actor.methods.remote())))

    def _wait(self, ref, method: str):
        ray, t0 = self._ray, time.perf_counter()
        try:
            return ray.get(ref, timeout=self._timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=False)
            raise TrainingError(
                f"ray backend: {self._name}.{method} stalled: no result after {time.perf_counter() - t0:.0f} s "
                f"(ray.timeout_s={self._timeout_s:g})"
            ) from None
        except ray.exceptions.RayActorError as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise _ActorDied(
                f"ray backend: the {self._name} actor died during {self._name}.{method} after "
                f"{time.perf_counter() - t0:.1f} s ({type(e).__name__}: {first})"
            ) from None
        except ray.exceptions.RayTaskError as e:
            # The role's own error (a RewardError, the bad-step guard's TrainingError, ...),
            # as in process; its message, not Ray's traceback, is what the user sees.
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None

    def _call(self, method: str, submit: Callable[[Any], Any]):
        """ray.get(submit(actor)) under the deadline, restarting a dead actor and retrying."""
        while True:
            actor = self._actor
            try:
                return self._wait(submit(actor), method)
            except _ActorDied as died:
                self._restart(actor, method, died)

    def _restart(self, dead, method: str, died: _ActorDied) -> None:
        """Replace the dead actor (unless another thread already did), or raise `died`."""
        with self._lock:
            if self._actor is not dead:
                return
            while True:
                if self._restarted >= self._max_restarts:
                    if self._max_restarts:
                        raise TrainingError(
                            f"{died}; no restarts left (ray.max_restarts={self._max_restarts})"
                        ) from None
                    raise died from None
                object.__setattr__(self, "_restarted", self._restarted + 1)
                self._restarts.add()
                log.warning("ray backend: the %s actor died during %s.%s; restarting it (restart %d of "
                            "ray.max_restarts=%d)", self._name, self._name, method, self._restarted,
                            self._max_restarts)  # fmt: skip
                try:
                    self._ray.kill(dead, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone: nothing left to kill
                    pass
                new = self._spawn()
                try:
                    self._wait(new.methods.remote(), "build")
                    for name, (args, kwargs) in self._last.items():  # back to the state it had
                        self._wait(new.call.remote(name, args, kwargs), name)
                except _ActorDied as again:
                    dead, died, method = new, again, "build"
                    continue
                object.__setattr__(self, "_actor", new)
                return

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._methods:
            return self._call(name, lambda actor: actor.get.remote(name))
        if name == "weights":  # the one result that should not travel through the driver
            return lambda: RemoteWeights(*self._call("weights", lambda actor: actor.weights.remote()))

        def remote(*args, **kwargs):
            out = self._call(name, lambda actor: actor.call.remote(name, args, kwargs))
            if name in self._replayed:
                self._last[name] = (args, kwargs)  # what a restarted actor replays
            return out

        return remote

    def pid(self) -> int:
        """The process id of the role's current actor."""
        return self._call("pid", lambda actor: actor.pid.remote())

    def __setattr__(self, name: str, value):
        raise AttributeError(f"ray backend: the controller set {name!r} on the remote {self._name} role")


def _needed_roles(cfg: RLConfig, spec: RLSpec) -> list[str]:
    """The roles this run has, in the in-process build order."""
    wanted = {
        "policy": True,
        "generator": True,
        "reference": spec.uses_reference,
        "critic": spec.critic,
        "teacher": spec.teacher_mode != "none",
        "rewards": True,
    }
    return [r for r in RAY_ROLES if wanted[r]]


# What a restarted actor replays to get back to the state it had: the rollout workers their
# last weight sync, the reference its last refresh. The learners are never restarted.
_REPLAYED = {"generator": ("sync",), "reference": ("refresh_from",)}
_NEVER_RESTARTED = ("policy", "critic")


def _actor_names(cfg: RLConfig, spec: RLSpec) -> dict[str, str]:
    """actor key -> role: one key per role, the rollout workers as generator[i] when several."""
    n = cfg.ray.rollout_workers
    out = {}
    for role in _needed_roles(cfg, spec):
        keys = [f"generator[{i}]" for i in range(n)] if role == "generator" and n > 1 else [role]
        out.update({key: role for key in keys})
    return out


def describe_placement(cfg: RLConfig, spec: RLSpec) -> str:
    """The `plan` line for backend: ray: each role's actor(s) and what each asks for."""
    r = cfg.ray
    where = f"joins {r.address}" if r.address else "starts a local Ray instance"
    per_actor = {role: role_resources(r, role, cfg.model.device) for role in _needed_roles(cfg, spec)}
    asks = []
    for role, res in per_actor.items():
        count = f"{r.rollout_workers} × " if role == "generator" and r.rollout_workers > 1 else ""
        asks.append(
            f"{count}{role} ({res['num_cpus']:g} CPU"
            + (f", {res['num_gpus']:g} GPU)" if res["num_gpus"] else ")")
        )
    from posttrain.train.rl.ray_group import describe_groups

    bucket = f"{r.sync_bucket_mb:g} MB buckets" if r.sync_bucket_mb else "one object"
    mode = (
        f"asynchronous, max_staleness {cfg.rollout.max_staleness}"
        if cfg.rollout.max_staleness
        else "synchronous"
    )
    return (f"backend: ray ({where}, {mode}); actors: {', '.join(asks)}; weight sync in {bucket}; "
            f"up to {r.max_restarts} restarts per rollout / reward / scorer actor"
            f"{describe_groups(cfg, _needed_roles(cfg, spec))}{describe_placement_groups(cfg, per_actor)}")  # fmt: skip


def _start(ray, cfg: RLConfig, needs: dict[str, dict[str, float]]) -> bool:
    """Join ray.address, or start a local instance sized for the roles. True when this run
    called ray.init, so that `shutdown` ends it (a local instance stops; a cluster is only
    left). A process that had already initialised Ray keeps it as it was."""
    r = cfg.ray
    if ray.is_initialized():
        return False
    if r.address is not None:
        ray.init(address=r.address, include_dashboard=False)
        return True
    cpus = (
        r.num_cpus
        if r.num_cpus is not None
        else max(1, math.ceil(sum(n["num_cpus"] for n in needs.values())))
    )
    ray.init(num_cpus=cpus, num_gpus=r.num_gpus, include_dashboard=False)
    return True


def _check_fits(ray, needs: dict[str, dict[str, float]]) -> None:
    """ConfigError when the roles ask for more CPUs / GPUs than the cluster has (the actors
    would wait for resources forever)."""
    have = ray.cluster_resources()
    for key, res in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        total = sum(n[key] for n in needs.values())
        if total > have.get(res, 0.0) + 1e-9:
            asks = ", ".join(f"{role} {n[key]:g}" for role, n in needs.items() if n[key])
            raise ConfigError(
                f"ray: the roles ask for {total:g} {res}s ({asks}) but the Ray cluster has {have.get(res, 0.0):g}; "
                f"lower ray.roles.<role>.{key} or give the cluster more"
            )


class RayBuild:
    """`build` for RLTrainer: the roles as actors; `shutdown()` ends what it started.

    handles: actor key (see `_actor_names`) -> its RemoteRole; `actors` the current actors
    (a restart replaces one); `metrics()` what the controller adds to each step's row."""

    def __init__(self):
        self.ray = None
        self.started = False
        self.handles: dict[str, RemoteRole] = {}
        self.pool: GeneratorPool | None = None
        self.restarts = RestartCounter()
        self.groups: dict[str, Any] = {}  # learner groups (ray.learners > 1), train/rl/ray_group.py
        self.placement: Placement | None = None  # placement groups, train/rl/ray_placement.py

    @property
    def actors(self) -> dict[str, Any]:
        return {key: handle._actor for key, handle in self.handles.items()}

    def __call__(self, cfg: RLConfig, spec: RLSpec) -> dict[str, Any]:
        from posttrain.train.rl import setup
        from posttrain.train.rl.ray_group import total_needs

        ray = self.ray = import_ray()
        self.placement = Placement(ray)
        names = _actor_names(cfg, spec)
        needs = {key: role_resources(cfg.ray, role, cfg.model.device) for key, role in names.items()}
        data = setup.load_data(cfg)  # the data is read and checked before any actor starts
        self.started = _start(ray, cfg, total_needs(cfg, needs))
        try:
            return self._build(cfg, spec, names, needs, data)
        except BaseException:
            self.shutdown()  # actors and placement groups built so far; the local instance
            raise

    def _build(
        self, cfg: RLConfig, spec: RLSpec, names: dict[str, str], needs: dict, data: dict
    ) -> dict[str, Any]:
        from posttrain.train.rl import setup
        from posttrain.train.rl.ray_group import LearnerGroup, grouped, total_needs

        ray = self.ray
        _check_fits(ray, total_needs(cfg, needs))
        # Every multi-actor role reserved whole (one placement group each) before any actor starts.
        self.placement.reserve(cfg, {role: needs[key] for key, role in names.items()})
        host = ray.remote(RoleHost)
        index = {key: i for i, key in enumerate(k for k in names if names[k] == "generator")}
        for key, role in names.items():
            if grouped(cfg, role):  # a learner group: N actors on one torch.distributed group
                members = [{**needs[key], **self.placement.options(role, i)} for i in range(cfg.ray.learners)]
                self.groups[key] = LearnerGroup(
                    ray, cfg, spec, role, data["tokenizer"], data["lengths"], members
                )
                continue

            def spawn(key=key, role=role):  # a restarted rollout worker goes back into its bundle
                where = self.placement.options(role, index.get(key, 0))
                return host.options(**needs[key], **where).remote(
                    cfg, spec, role, data["tokenizer"], data["lengths"]
                )

            self.handles[key] = RemoteRole(
                ray, spawn, key, cfg.ray.timeout_s, restarts=self.restarts, replayed=_REPLAYED.get(role, ()),
                max_restarts=0 if role in _NEVER_RESTARTED else cfg.ray.max_restarts,
            )  # fmt: skip
        self.pool = GeneratorPool([h for key, h in self.handles.items() if names[key] == "generator"])
        roles = {**self.handles, **self.groups}
        built = {name: roles.get(name) for name in ("policy", "reference", "critic", "teacher")}
        built["generator"] = self.pool
        built["rewards"] = self.handles["rewards"]
        # The rollout workers start from the learner's version-0 weights, as a sync would leave them.
        self.pool.sync(roles["policy"].weights())
        return {**setup.assemble(cfg, data, built), "backend_metrics": self.metrics}

    def metrics(self) -> dict[str, float]:
        """`ray/restarts` (actor restarts since the previous row) and `sync/buckets` (object
        store buckets of the last weight sync)."""
        return {"ray/restarts": float(self.restarts.take()), "sync/buckets": float(self.pool.last_buckets)}

    def shutdown(self) -> None:
        """Kill the role actors; stop the local Ray instance this run started (or leave the
        cluster it joined)."""
        if self.ray is None:
            return
        for group in self.groups.values():
            group.close()
        self.groups.clear()
        if self.pool is not None:
            self.pool.close()
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.handles.clear()
        self.placement.remove()
        if self.started:
            self.ray.shutdown()
            self.started = False


def run_rl_on_ray(cfg: RLConfig) -> dict[str, Any]:
    """`posttrain rl` with backend: ray: the in-process trainer over actor roles."""
    from posttrain.train.rl.controller import RLTrainer

    build = RayBuild()
    try:
        summary = RLTrainer(cfg, build=build).train()
    finally:
        build.shutdown()
    summary["backend"] = "ray"
    return summary
