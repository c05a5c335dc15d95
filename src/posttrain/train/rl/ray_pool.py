"""The Ray backend's rollout side: bucketed weight transfer and the pool of rollout workers.

Weights (`RemoteWeights`): the policy learner's actor puts its state dict in Ray's object
store as buckets of at most `ray.sync_bucket_mb` MB (2^20 bytes) — tensors in state-dict
order, a tensor larger than a bucket in a bucket of its own, 0 = one object — and returns
only their refs; a rollout worker fetches and loads them one bucket at a time
(`sync_by_bucket`), so besides its model it holds at most one bucket. The values loaded are
the learner's, bit for bit, whatever the bucket size.

Pool (`GeneratorPool`): `ray.rollout_workers` generator actors behind the `Generator`
interface the controller and `collect` use. `run_shards` (called by
train/rl/shards.py's `sample_round`) runs a round's shards concurrently, shard i on worker
i mod N, each worker its shards in order, and returns the results in shard order; since
each shard has its own derived seed, N workers sample exactly what one process with
`rollout.shards = N` samples. `sync` sends the same weights to every worker concurrently
(returns the bytes all of them received). `generate` (held-out evaluation, the difficulty
filter) runs on worker 0, which is synced like the others.
With N > 1 the workers are reserved together as one placement group, worker i in bundle i,
and a restarted worker goes back into its bundle (`ray.rollout_placement`, train/rl/ray_placement.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from posttrain.errors import TrainingError
from posttrain.roles.weights import StateDictWeights

MB = 2**20


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def cut_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[dict[str, torch.Tensor]]:
    """`tensors` (in their order) cut into consecutive buckets of at most `bucket_bytes`
    bytes; a tensor larger than that gets a bucket of its own; bucket_bytes <= 0: one bucket."""
    if bucket_bytes <= 0:
        return [dict(tensors)] if tensors else []
    buckets: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors.items():
        n = nbytes(tensor)
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += n
    if current:
        buckets.append(current)
    return buckets


class RemoteWeights:
    """A `WeightSource` whose tensors stay in Ray's object store as buckets: `version` is
    here, the buckets are fetched by whoever is synced with it, so a weight sync moves them
    learner -> object store -> rollout worker without passing the driver."""

    def __init__(self, version: int, refs: list):
        self.version = version
        self.refs = refs

    def buckets(self) -> Iterator[dict[str, torch.Tensor]]:
        """The buckets, each fetched (ray.get in the calling process) only when reached."""
        import ray

        for ref in self.refs:
            yield ray.get(ref)

    def fetch(self) -> StateDictWeights:
        """All buckets as one StateDictWeights snapshot (for receivers that load a whole
        state dict: the reference refresh, an engine that keeps its own weights)."""
        tensors: dict[str, torch.Tensor] = {}
        for bucket in self.buckets():
            tensors.update(bucket)
        return StateDictWeights(self.version, tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot's tensors (fetched into the calling process)."""
        return self.fetch().state_dict()


def sync_by_bucket(generator, weights: RemoteWeights) -> int:
    """`generator.sync(weights)` one bucket at a time into its in-process model; returns the
    bytes received. Every tensor of the model must be set, with its own shape."""
    target = generator.model.state_dict()  # name -> tensor sharing the parameters' storage
    loaded: set[str] = set()
    received = 0
    with torch.no_grad():
        for bucket in weights.buckets():
            for name, tensor in bucket.items():
                if name not in target or target[name].shape != tensor.shape:
                    raise TrainingError(f"ray backend: weight sync sent {name!r}, which the rollout worker's "
                                        f"model does not have with shape {tuple(tensor.shape)}")  # fmt: skip
                target[name].copy_(tensor)
                received += nbytes(tensor)
            loaded.update(bucket)
    missing = sorted(target.keys() - loaded)
    if missing:
        raise TrainingError(
            f"ray backend: weight sync left {len(missing)} tensors unset, e.g. {missing[0]!r}"
        )
    generator.version = weights.version
    return received


class RestartCounter:
    """Restarts of role actors (all roles), read as `ray/restarts` per metrics row."""

    def __init__(self):
        self._lock = threading.Lock()
        self._total = 0
        self._reported = 0

    def add(self) -> None:
        with self._lock:
            self._total += 1

    def take(self) -> int:
        """Restarts since the previous `take`."""
        with self._lock:
            new, self._reported = self._total - self._reported, self._total
            return new


def _sum_counters(parts: list[dict]) -> dict:
    """Generator.counters() of several workers added up (ints, and dicts of ints by key)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                out[key] = out.get(key, 0) + value
    return out


class GeneratorPool:
    """`ray.rollout_workers` rollout workers (`RemoteRole` handles) as one Generator."""

    def __init__(self, workers: list):
        self.workers = workers
        # Two executors: a shard job running on a lane may itself sync the workers (partial
        # rollouts sync between segments), which must not wait for a free lane thread.
        self._lanes = ThreadPoolExecutor(len(workers), thread_name_prefix="rollout-lane")
        self._threads = ThreadPoolExecutor(len(workers), thread_name_prefix="rollout-worker")
        self.last_buckets = 0  # buckets of the last sync (`sync/buckets`)

    def _concurrently(
        self, calls: list[Callable[[], Any]], executor: ThreadPoolExecutor | None = None
    ) -> list:
        """Run `calls` on the pool's threads; wait for all; results in order (the first
        error, in order, is raised once every call has ended)."""
        futures = [(executor or self._threads).submit(call) for call in calls]
        wait(futures)
        return [f.result() for f in futures]

    def run_shards(self, jobs: list[Callable[[Any], Any]]) -> list:
        """`job(worker)` for each job, job i on worker i mod N, concurrently across workers;
        the results in job order."""
        n = len(self.workers)

        def lane(w: int) -> list:
            return [(i, jobs[i](self.workers[w])) for i in range(w, len(jobs), n)]

        lanes = self._concurrently([lambda w=w: lane(w) for w in range(min(n, len(jobs)))], self._lanes)
        return [result for _, result in sorted((pair for done in lanes for pair in done), key=lambda p: p[0])]

    def generate(self, prompts: list[list[int]], params, rows: list[dict] | None = None):
        """One call on worker 0 (held-out evaluation, the difficulty filter)."""
        return self.workers[0].generate(prompts, params, rows=rows)

    def counters(self) -> dict:
        """The workers' running totals, added up."""
        return _sum_counters(self._concurrently([w.counters for w in self.workers]))

    def sync(self, weights) -> int:
        """Every worker loads `weights` (concurrently); the bytes all of them received."""
        self.last_buckets = len(getattr(weights, "refs", ())) or 1
        return sum(self._concurrently([lambda w=w: w.sync(weights) for w in self.workers]))

    @property
    def version(self) -> int:
        """The policy version of the workers' weights (worker 0's; all are synced alike)."""
        return self.workers[0].version

    def close(self) -> None:
        self._lanes.shutdown(wait=True)
        self._threads.shutdown(wait=True)
