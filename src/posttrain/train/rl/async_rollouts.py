"""Asynchronous RL with bounded staleness: a rollout thread that runs ahead of training.

With `rollout.max_staleness = k >= 1` one background thread calls `collect` for steps
0, 1, 2, ... in order while the controller trains. Policy version v is the number of
updates applied (the learner's weights after the update of step s - 1 are version s).

Schedule (deterministic, so a run is reproducible and an in-process run equals a Ray run
bit for bit):
  - whole generations: collect(s) starts once version max(0, s - k) is published and
    samples every token with exactly that version (not "the newest available"), so every
    trained token has staleness s - version = min(s, k) <= k;
  - partial rollouts (`rollout.partial_tokens = n`): collect(s) generates in segments of n
    new tokens; segment j uses version max(0, min(s - k + j, s)) (waiting for it to be
    published), so a long generation continues under fresher weights; staleness <= k still.
    With a multi-turn environment every model turn is generated in segments and j runs on
    across turns (a new turn starts a new segment), so newer weights may also arrive between
    two turns (engines/rollout/multiturn.py, "Segments").

The controller publishes each new version after its update (`publish`: a snapshot of the
weights, since an in-process learner keeps training its module) and takes batch s from the
thread (`take`, blocking with a deadline: a stall is a one-line TrainingError naming the
thread's phase). An exception in the thread is re-raised in the controller's thread.

Exact accounting across checkpoint / resume (`state_dict` / `load_state_dict`): the
checkpoint pauses the thread at a safe point (between two collects, or between two
segments) and stores the batches collected for steps not yet trained, the PromptSource
state before the first collect not yet finished (a collect cut at a pause is redone from
scratch on resume, deterministically: same prompts, seeds and versions), and the weight
snapshots of the versions older than the learner's that this collect still needs (at most
k). A resumed run therefore trains exactly the batches the uninterrupted run trains: no
prompt is lost or trained twice.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from posttrain.errors import ConfigError, TrainingError
from posttrain.roles import StateDictWeights


def check_async(cfg, spec) -> None:
    """rollout.max_staleness / partial_tokens / async_timeout_s: one-line ConfigErrors."""
    ro = cfg.rollout
    k, n = ro.max_staleness, ro.partial_tokens
    if k < 0 or n < 0:
        key = "max_staleness" if k < 0 else "partial_tokens"
        raise ConfigError(f"rollout.{key} must be >= 0 (0 = off), got {getattr(ro, key)}")
    if not (ro.async_timeout_s > 0 and ro.async_timeout_s < float("inf")):
        raise ConfigError(
            f"rollout.async_timeout_s must be a positive number of seconds, got {ro.async_timeout_s}"
        )
    if n and not k:
        raise ConfigError(
            "rollout.partial_tokens continues samples under newer versions: it needs rollout.max_staleness >= 1"
        )
    if not k:
        return
    if spec.trust_region is not None:
        raise ConfigError(
            "rollout.max_staleness >= 1 is not supported with algo.trust_region (TRPO): its line search assumes on-policy samples"
        )
    if not n:
        return
    for key, on in (
        # The turn loop of a multi-turn rollout runs inside the rollout worker; the segment
        # schedule (waiting for and syncing versions) runs in the driver's rollout thread.
        ("env.name on backend: ray", cfg.env.name is not None and cfg.backend == "ray"),
        ("rollout.prm_guide", cfg.rollout.prm_guide.model_path is not None),
        ("rollout.thinking_budget", ro.thinking_budget > 0),
        ("rollout.engine=vllm", ro.engine == "vllm"),
        # Segments sync the rollout workers between shards' calls; with several workers the
        # shards run concurrently and one shard's sync would reach another mid-schedule.
        ("ray.rollout_workers > 1", cfg.backend == "ray" and cfg.ray.rollout_workers > 1),
    ):
        if on:
            raise ConfigError(f"rollout.partial_tokens is not supported with {key}")


def _plain(batch) -> dict:
    """An RLBatch as nested dicts of tensors / lists / ints (what torch.load(weights_only) reads)."""
    from dataclasses import fields

    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        out[f.name] = {g.name: getattr(v, g.name) for g in fields(v)} if f.name == "seq" else v
    return out


def _unplain(d: dict):
    from posttrain.engines.batching import SequenceBatch
    from posttrain.roles import RLBatch

    return RLBatch(**{**d, "seq": SequenceBatch(**d["seq"])})


def snapshot(weights) -> Any:
    """A WeightSource that no later update changes: an in-process `SharedModule` (the
    learner's live module) is copied; a snapshot (StateDictWeights, Ray's RemoteWeights)
    already is one."""
    if getattr(weights, "module", None) is None:
        return weights
    return StateDictWeights(weights.version, {k: v.clone() for k, v in weights.state_dict().items()})


class _Stopped(Exception):
    """Raised inside the rollout thread when the controller stops it."""


class AsyncRollouts:
    """The rollout thread and its queue (see the module docstring).

    collect_step: (step, version, before_segment or None) -> (RLBatch, metrics); runs
        `collect` for that step with the generator already synced to `version`.
    sync: (WeightSource) -> bytes received; syncs the generator.
    prompts: the PromptSource (its state is checkpointed from here: the thread advances it).
    start: the first step to collect; steps: the run's number of steps.
    timeout_s: longest wait for a batch or a pause; timeout_key names the setting.
    """

    def __init__(
        self,
        collect_step: Callable,
        sync: Callable,
        prompts,
        *,
        max_staleness: int,
        partial_tokens: int,
        start: int,
        steps: int,
        timeout_s: float,
        timeout_key: str,
    ):
        self.collect_step, self.sync, self.prompts = collect_step, sync, prompts
        self.k, self.partial, self.steps = max_staleness, partial_tokens > 0, steps
        self.timeout_s, self.timeout_key = timeout_s, timeout_key
        self._cond = threading.Condition()
        self._published: dict[int, Any] = {}
        self._ready: dict[int, tuple[Any, dict]] = {}
        self._next = start  # the first step whose collect has not finished
        self._prompt_before = copy.deepcopy(prompts.state_dict())  # PromptSource state before collect(_next)
        self._synced: int | None = None  # the version the thread last synced the generator to
        self._phase = "starting"
        self._error: BaseException | None = None
        self._pause = self._parked = self._stop = self._done = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ controller side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="posttrain-rollouts", daemon=True)
        self._thread.start()

    def publish(self, weights) -> None:
        """Make `weights` (a snapshot, see `snapshot`) available to the thread."""
        with self._cond:
            self._published[weights.version] = weights
            self._prune()
            self._cond.notify_all()

    def take(self, step: int) -> tuple[Any, dict[str, float], float]:
        """(batch, metrics, seconds waited) for `step`; blocks up to timeout_s."""
        t0 = time.perf_counter()
        with self._cond:
            while step not in self._ready:
                self._raise_error()
                self._wait_or_stall(t0, f"the batch of step {step + 1}", done_is_final=True)
            batch, metrics = self._ready.pop(step)
        return batch, metrics, time.perf_counter() - t0

    @contextmanager
    def paused(self):
        """Hold the thread at a safe point (no generate / reward call running) for the
        block: the controller may then use the generator (evaluation) or checkpoint."""
        t0 = time.perf_counter()
        with self._cond:
            self._pause = True
            self._cond.notify_all()
            try:
                while not (self._parked or self._done):
                    self._raise_error()
                    self._wait_or_stall(t0, "a safe point to pause at (evaluation or checkpoint)")
            except BaseException:
                self._pause = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._synced = None  # the controller may have synced the generator itself
                self._pause = False
                self._cond.notify_all()

    def stop(self) -> None:
        """End the thread (at its next safe point); waits briefly for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=min(self.timeout_s, 30.0))

    def state_dict(self, current_version: int) -> dict:
        """Checkpoint payload; call inside `paused()`. current_version: the learner's."""
        first_needed = max(0, self._next - self.k)
        return {
            "next": self._next,
            "ready": {s: {"batch": _plain(b), "metrics": m} for s, (b, m) in self._ready.items()},
            "weights": {
                v: dict(w.state_dict())
                for v, w in self._published.items()
                if first_needed <= v < current_version
            },
        }

    def prompt_state(self) -> dict:
        """The PromptSource state a resumed run restarts collecting from (call inside `paused()`)."""
        return copy.deepcopy(self._prompt_before)

    def load_state_dict(self, state: dict) -> None:
        """Restore the queue and the old weight snapshots (before `start`; the PromptSource
        is restored by the caller from `prompt_state()`'s checkpointed value)."""
        self._next = int(state["next"])
        self._ready = {int(s): (_unplain(r["batch"]), dict(r["metrics"])) for s, r in state["ready"].items()}
        for v, tensors in state["weights"].items():
            self._published[int(v)] = StateDictWeights(int(v), tensors)
        self._prompt_before = copy.deepcopy(self.prompts.state_dict())

    # ------------------------------------------------------------ thread side

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    step = self._next
                    self._prompt_before = copy.deepcopy(self.prompts.state_dict())
                    if step >= self.steps:
                        break
                version = max(0, step - self.k)
                weights = self._wait_version(
                    version, f"waiting for policy version {version} to collect step {step + 1}"
                )
                sync_s, sync_bytes = self._sync(weights)
                self._phase = f"collecting step {step + 1} (version {version})"
                hook = self._segment_hook(step) if self.partial else None
                batch, metrics = self.collect_step(step, version, hook)
                metrics["sync/bytes"] = sync_bytes + metrics.get("sync/bytes", 0)
                metrics["time/weight_sync_s"] = sync_s + metrics.get("time/weight_sync_s", 0.0)
                with self._cond:
                    self._ready[step] = (batch, metrics)
                    self._next = step + 1
                    self._prune()
                    self._cond.notify_all()
        except _Stopped:
            pass
        except BaseException as e:  # handed to the controller's thread by take() / paused()
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                self._phase = "finished"
                self._cond.notify_all()

    def _segment_hook(self, step: int) -> Callable[[int], None]:
        """before_segment(j) of collect(step): sync to version max(0, min(step - k + j, step))."""

        def before_segment(j: int) -> None:
            version = max(0, min(step - self.k + j, step))
            weights = self._wait_version(
                version, f"waiting for policy version {version} (step {step + 1}, segment {j})"
            )
            self._sync(weights)
            self._phase = f"collecting step {step + 1} (segment {j}, version {version})"

        return before_segment

    def _wait_version(self, version: int, phase: str):
        """Block until `version` is published; the safe point where a pause parks the thread."""
        with self._cond:
            self._phase = phase
            while True:
                if self._stop:
                    raise _Stopped
                if self._pause:
                    self._parked = True
                    self._cond.notify_all()
                    while self._pause and not self._stop:
                        self._cond.wait()
                    self._parked = False
                    continue
                if version in self._published:
                    return self._published[version]
                self._cond.wait()

    def _sync(self, weights) -> tuple[float, int]:
        if self._synced == weights.version:
            return 0.0, 0
        t0 = time.perf_counter()
        received = self.sync(weights)
        self._synced = weights.version
        return time.perf_counter() - t0, received

    # ------------------------------------------------------------ helpers (lock held)

    def _prune(self) -> None:
        """Drop snapshots no collect will need again (older than max(0, next - k))."""
        first_needed = max(0, self._next - self.k)
        newest = max(self._published, default=-1)
        for v in [v for v in self._published if v < first_needed and v != newest]:
            del self._published[v]

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_or_stall(self, t0: float, what: str, done_is_final: bool = False) -> None:
        """Wait for a notification, at most until t0 + timeout_s; past it (or, with
        done_is_final, once the thread has ended without it) a one-line TrainingError."""
        left = self.timeout_s - (time.perf_counter() - t0)
        if left <= 0 or (done_is_final and self._done and self._error is None):
            raise TrainingError(
                f"async rollouts: the rollout thread stalled: waited {time.perf_counter() - t0:.0f} s for {what} "
                f"while it was {self._phase} ({self.timeout_key}={self.timeout_s:g})"
            )
        self._cond.wait(timeout=left)


def staleness_metrics(step: int, versions: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """async/staleness_mean, async/staleness_max (token-weighted step - version over mask),
    async/partial_frac (share of samples whose tokens came from more than one version).

    versions: [B, T] long policy version per response token; mask: [B, T] float.
    """
    on = mask > 0  # [B, T]
    stale = (step - versions).float()  # [B, T]
    n = on.sum().clamp(min=1)
    big = torch.iinfo(versions.dtype).max
    vmax = torch.where(on, versions, -1).amax(-1)  # [B]
    vmin = torch.where(on, versions, big).amin(-1)  # [B]
    has = on.any(-1)  # [B]
    return {
        "async/staleness_mean": float((stale * on).sum() / n),
        "async/staleness_max": float(stale[on].max()) if on.any() else 0.0,
        "async/partial_frac": float(((vmax > vmin) & has).float().mean()) if len(versions) else 0.0,
    }


def behaviour_metrics(step, versions, mask, old_logprobs, sampling_logprobs) -> dict[str, float]:
    """The behaviour factor of π_θ/μ: KL(μ ‖ π_old) (k3 estimator on the sampled tokens,
    token mean) split into fresh tokens (staleness 0: the pure train–infer gap) and stale
    tokens (gap + staleness). π_old is the learner at version `step` (the proximal policy).

    versions, mask, old_logprobs, sampling_logprobs: [B, T].
    """
    from posttrain.core.kl import KL_ESTIMATORS

    k3 = KL_ESTIMATORS["k3"](sampling_logprobs, old_logprobs)  # [B, T]
    on = mask > 0
    out = {}
    for name, sel in (("fresh", on & (versions == step)), ("stale", on & (versions < step))):
        out[f"async/behave_kl_{name}"] = float(k3[sel].mean()) if sel.any() else 0.0
        out[f"async/{name}_token_frac"] = float(sel.sum() / on.sum().clamp(min=1))
    return out


def describe_async(cfg) -> str:
    """The `plan` line of the rollout schedule."""
    k, n = cfg.rollout.max_staleness, cfg.rollout.partial_tokens
    if not k:
        return "rollouts: synchronous (step s samples with policy version s)"
    line = (
        f"rollouts: asynchronous, max_staleness {k}: a background thread samples step s with policy version "
        f"max(0, s - {k}) while the learner trains"
    )
    if n:
        line += (
            f"; partial rollouts: segments of {n} tokens, segment j with version max(0, min(s - {k} + j, s))"
        )
    return line


class QueueCheckpoint:
    """The checkpoint part "async_rollouts" of a trainer (saved with its schedulers: an object
    with state_dict / load_state_dict). Saving reads the running thread's queue (the caller
    holds the thread paused); loading keeps the payload for `RLTrainer.start_rollouts`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        rollouts = self.trainer.rollouts
        if rollouts is None:  # not started: nothing collected ahead
            return {"next": self.trainer.step_count, "ready": {}, "weights": {}}
        return rollouts.state_dict(self.trainer.step_count)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state
