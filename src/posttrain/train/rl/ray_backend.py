"""`backend: ray`: the roles of the RL loop as Ray actors, driven by the unchanged controller.

The controller (`RLTrainer`, train/rl/controller.py) takes a `build` function that returns
its roles; `RayBuild` returns `RemoteRole` handles instead of the objects. Each handle
exposes the role's methods and turns a call into `ray.get(actor.call.remote(...))` under
the `ray.timeout_s` deadline, so the controller's code is the in-process code: only plain
data crosses (what tests/roles/test_process_boundary.py already proves with a pickling
proxy). What runs where:

  driver (this process): the controller, the tokenizer, the prompts (`PromptSource`),
      the held-out data, the checkpoint files;
  one actor per role: the rollout worker (`Generator`, with its OWN copy of the policy,
      synced through `Generator.sync(weights)` with a state-dict snapshot carrying the
      policy version, fetched from Ray's object store: `RemoteWeights`), the policy learner, the critic learner, the reference and teacher
      scorers, the rewarder. Each asks Ray for `ray.roles.<role>` CPUs / GPUs.

Every actor seeds python and torch with run.seed and builds its models in the order the
in-process `build_components` does, so each model starts from the same weights as in
process (the reference and critic replay the policy's initialisation), and a synchronous
Ray run trains bit-identically to the in-process one (tests/distributed/test_rl_ray.py).

With `ray.learners: N > 1` the policy and critic learners are each a group of N actors on
one torch.distributed process group, FSDP2-sharded as `--nproc N` ranks are; `RayBuild`
builds a `LearnerGroup` handle for them instead (train/rl/ray_group.py).

Synchronous only: each step waits for generation, scoring and the update in turn.
Asynchronous generation with bounded staleness, restarting dead actors and re-queueing
their work are later work (issue #19). Ray is imported lazily: without it installed,
only `backend: ray` fails, with a one-line error.
"""

from __future__ import annotations

import math
import random
import time
from functools import partial
from typing import Any

import torch

from posttrain.algos.spec import RLSpec
from posttrain.errors import ConfigError, TrainingError
from posttrain.train.config.ray import RAY_ROLES, role_resources
from posttrain.train.config.rl import RLConfig


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


class RemoteWeights:
    """A `WeightSource` whose snapshot stays in Ray's object store: `version` is here,
    the tensors are fetched by whoever is synced with it (`RoleHost.call`), so a weight sync
    moves them learner -> object store -> rollout worker without passing the driver."""

    def __init__(self, version: int, ref):
        self.version = version
        self.ref = ref

    def fetch(self):
        """The StateDictWeights snapshot (ray.get in the receiving process)."""
        import ray

        return ray.get(self.ref)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot's tensors (fetched into the calling process)."""
        return self.fetch().state_dict()


class RoleHost:
    """The body of a role's actor: builds the role, then runs the methods asked of it."""

    def __init__(self, cfg: RLConfig, spec: RLSpec, name: str, tokenizer, lengths):
        self.role = _role(cfg, spec, name, tokenizer, lengths)

    def methods(self) -> list[str]:
        """The role's public methods (what the handle forwards as calls)."""
        return [n for n in dir(self.role) if not n.startswith("_") and callable(getattr(self.role, n))]

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """role.method(*args, **kwargs); the result travels back pickled. A `RemoteWeights`
        argument is fetched here, from the object store, not through the driver."""
        args = tuple(a.fetch() if isinstance(a, RemoteWeights) else a for a in args)
        return getattr(self.role, method)(*args, **kwargs)

    def weights(self) -> tuple[int, list]:
        """(policy version, [object ref of its StateDictWeights snapshot]): the learner's
        weights put in the object store once, for the rollout worker and the reference to
        fetch (the list keeps Ray from resolving the ref on the way to the driver)."""
        import ray

        w = self.role.weights()
        return w.version, [ray.put(w)]  # pickling a SharedModule makes the snapshot

    def get(self, attribute: str) -> Any:
        """A copy of a plain attribute of the role (e.g. a learner's `guard`)."""
        return getattr(self.role, attribute)


class RemoteRole:
    """A role in a Ray actor, called like the object itself (synchronously).

    Methods are forwarded as `actor.call`; a plain attribute read returns a copy. Every
    call waits at most `timeout_s`: a stalled call, or an actor that died, raises a
    one-line TrainingError naming the role, the method and the seconds waited.
    """

    def __init__(self, ray, actor, name: str, timeout_s: float):
        object.__setattr__(self, "_ray", ray)
        object.__setattr__(self, "_actor", actor)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_timeout_s", timeout_s)
        object.__setattr__(self, "_methods", set(self._wait(actor.methods.remote(), "build")))

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
            raise TrainingError(
                f"ray backend: the {self._name} actor died during {self._name}.{method} after "
                f"{time.perf_counter() - t0:.1f} s ({type(e).__name__}: {first})"
            ) from None
        except ray.exceptions.RayTaskError as e:
            # The role's own error (a RewardError, the bad-step guard's TrainingError, ...),
            # as in process; its message, not Ray's traceback, is what the user sees.
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._methods:
            return self._wait(self._actor.get.remote(name), name)
        if name == "weights":  # the one result that should not travel through the driver
            return lambda: RemoteWeights(*self._wait_weights())

        def remote(*args, **kwargs):
            return self._wait(self._actor.call.remote(name, args, kwargs), name)

        return remote

    def _wait_weights(self):
        version, (ref,) = self._wait(self._actor.weights.remote(), "weights")
        return version, ref

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


def describe_placement(cfg: RLConfig, spec: RLSpec) -> str:
    """The `plan` line for backend: ray: each role's actor and what it asks for."""
    where = f"joins {cfg.ray.address}" if cfg.ray.address else "starts a local Ray instance"
    asks = []
    for role in _needed_roles(cfg, spec):
        res = role_resources(cfg.ray, role, cfg.model.device)
        asks.append(
            f"{role} ({res['num_cpus']:g} CPU" + (f", {res['num_gpus']:g} GPU)" if res["num_gpus"] else ")")
        )
    from posttrain.train.rl.ray_group import describe_groups

    groups = describe_groups(cfg, _needed_roles(cfg, spec))
    return f"backend: ray ({where}, synchronous); actors: {', '.join(asks)}{groups}"


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
    """`build` for RLTrainer: the roles as actors; `shutdown()` ends what it started."""

    def __init__(self):
        self.ray = None
        self.started = False
        self.actors: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}  # learner groups (ray.learners > 1), train/rl/ray_group.py

    def __call__(self, cfg: RLConfig, spec: RLSpec) -> dict[str, Any]:
        from posttrain.train.rl import setup
        from posttrain.train.rl.ray_group import LearnerGroup, grouped, total_needs

        ray = self.ray = import_ray()
        roles = _needed_roles(cfg, spec)
        needs = {r: role_resources(cfg.ray, r, cfg.model.device) for r in roles}
        data = setup.load_data(cfg)  # the data is read and checked before any actor starts
        self.started = _start(ray, cfg, total_needs(cfg, needs))
        _check_fits(ray, total_needs(cfg, needs))
        host = ray.remote(RoleHost)
        for name in roles:
            if not grouped(cfg, name):
                self.actors[name] = host.options(**needs[name]).remote(
                    cfg, spec, name, data["tokenizer"], data["lengths"]
                )
        handles = {name: RemoteRole(ray, a, name, cfg.ray.timeout_s) for name, a in self.actors.items()}
        for name in filter(partial(grouped, cfg), roles):
            handles[name] = self.groups[name] = LearnerGroup(
                ray, cfg, spec, name, data["tokenizer"], data["lengths"], needs[name]
            )
        built = {
            name: handles.get(name) for name in ("policy", "generator", "reference", "critic", "teacher")
        }
        built["rewards"] = handles["rewards"]
        # The rollout worker starts from the learner's version-0 weights, as a sync would leave it.
        handles["generator"].sync(handles["policy"].weights())
        return setup.assemble(cfg, data, built)

    def shutdown(self) -> None:
        """Kill the role actors; stop the local Ray instance this run started (or leave the
        cluster it joined)."""
        if self.ray is None:
            return
        for group in self.groups.values():
            group.close()
        self.groups.clear()
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
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
