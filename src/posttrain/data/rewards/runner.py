"""Run several reward functions on a batch, in parallel, each sample under its own deadline.

A reward is f(prompts, completions, **columns) -> list[float | None], plain or async. The
runner gives every reward its own thread (async ones share one background event loop) and
calls it on the whole batch with a deadline of `timeout_s`. When that call runs past the
deadline or raises, every sample is scored again *alone* (a batch of one), up to
`max_workers` at a time, each with its own `timeout_s` deadline: a slow or crashing sample
fails alone and the others keep their scores. (A reward whose score of one sample depends
on the others, such as kimi_length's group statistics, sets ``fn.batch_dependent = True``
and is never split; then the whole batch fails.) Outcomes per reward and sample:

- a number with ``|x| <= MAX_ABS_REWARD`` (1e6): weighted into the sample's score;
- None: the reward does not apply to the sample (adds nothing to its score);
- an error — the call raised, ran past its deadline, returned something that is not a
  list of B entries, or an entry that is not a number or None, is NaN / inf, or is beyond
  ±MAX_ABS_REWARD (such a score would overflow float32 or swamp every other advantage):
  counted (``reward/errors_<name>`` in the metrics) and logged, and the sample is
  *excluded* (valid=False, score NaN), never silently scored 0.

A sample no reward applies to is excluded too (valid=False) but is not an error. When the
share of samples with an error exceeds `max_error_rate`, `score` raises RewardError.
Python cannot kill a thread: a call that never returns keeps its thread (listed in
`abandoned_threads`); rewards that run untrusted code should bound it themselves (the code
reward runs programs in `posttrain.data.sandbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import numbers
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.errors import ConfigError, RewardError

logger = logging.getLogger(__name__)

MAX_ABS_REWARD = 1e6  # a reward value beyond ±this is an error (see the module doc)

_call = threading.local()


def cancel_event() -> threading.Event | None:
    """For a reward running under `RewardRunner`: an Event set once the runner has given up
    on this call (it ran past its deadline). Python cannot stop a thread, so a reward that
    farms work out (worker processes, sandboxed programs) should check it between items and
    return early instead of keeping those workers from the samples scored after it. None
    outside a runner call."""
    return getattr(_call, "cancel", None)


@dataclass
class RewardResult:
    """Rewards of one batch of B samples.

    scores: [B] float32, Σ_k weight_k · reward_k over the rewards that apply; NaN where the
        sample is excluded (valid False).
    per_reward: name -> [B] float32 raw (unweighted) values, NaN where None or error.
    valid: [B] bool, False where any reward errored or none applied.
    errors: name -> number of samples on which that reward errored.
    messages: name -> the first error message of that reward in this batch.
    time_s: name -> wall seconds the reward took (the deadline when it hung).
    """

    scores: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    valid: torch.Tensor
    errors: dict[str, int]
    messages: dict[str, str] = field(default_factory=dict)
    time_s: dict[str, float] = field(default_factory=dict)


class _Loop:
    """One background asyncio loop shared by async rewards (never the caller's loop, so a
    caller inside asyncio can call `score` from a worker thread)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="posttrain-reward-loop", daemon=True).start()
                cls._loop = loop
            return cls._loop


def _accepted_columns(fn: Callable) -> set[str] | None:
    """Names of keyword columns fn accepts; None when it takes **kwargs (all of them)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _is_async(fn: Callable) -> bool:
    call = type(fn).__call__ if not inspect.isfunction(fn) else None  # a callable object
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


class RewardRunner:
    """Score batches with weighted rewards.

    rewards: [(name, fn, weight), ...]; names must be unique.
    timeout_s: deadline of one call: the whole batch first, then (when that call times out
        or raises) each sample alone; a sample whose own call runs past it is an error on
        that sample only (its thread is abandoned — Python cannot kill a thread — and kept
        in `abandoned_threads`).
    max_workers: reward calls running at once (batch calls of different rewards; samples
        scored alone).
    max_error_rate: the largest tolerated share of samples with an error in one batch.
    """

    def __init__(
        self,
        rewards: list[tuple[str, Callable, float]],
        timeout_s: float = 60.0,
        max_workers: int = 4,
        max_error_rate: float = 0.1,
    ):
        names = [r[0] for r in rewards]
        if not rewards:
            raise ConfigError("RewardRunner needs at least one reward")
        if len(set(names)) != len(names):
            raise ConfigError(f"reward names must be unique, got {names}")
        for name, fn, weight in rewards:
            if not callable(fn):
                raise ConfigError(f"reward {name!r} is not callable")
            if not isinstance(weight, numbers.Real) or not abs(weight) <= MAX_ABS_REWARD:
                raise ConfigError(
                    f"reward {name!r} weight must be a finite number within ±{MAX_ABS_REWARD:g}, got {weight!r}"
                )
        if timeout_s <= 0 or max_workers < 1 or not 0.0 <= max_error_rate <= 1.0:
            raise ConfigError("RewardRunner needs timeout_s > 0, max_workers >= 1, 0 <= max_error_rate <= 1")
        self.rewards = [(n, f, float(w)) for n, f, w in rewards]
        self.timeout_s = float(timeout_s)
        self.max_error_rate = float(max_error_rate)
        self.max_workers = int(max_workers)
        self._slots = threading.Semaphore(max_workers)
        self._columns = {n: _accepted_columns(f) for n, f, _ in rewards}
        self.abandoned_threads: list[threading.Thread] = []

    def score(
        self, prompts: list, completions: list[str], columns: dict[str, list] | None = None
    ) -> RewardResult:
        """Run every reward on the batch; see the module docstring for the outcomes."""
        columns = dict(columns or {})
        b = len(completions)
        if len(prompts) != b:
            raise RewardError(f"{len(prompts)} prompts for {b} completions")
        for k, v in columns.items():
            if len(v) != b:
                raise RewardError(f"column {k!r} has {len(v)} entries for {b} completions")
        deadline = time.monotonic() + self.timeout_s
        slots = {}
        for name, fn, _ in self.rewards:
            accepted = self._columns[name]
            kw = columns if accepted is None else {k: v for k, v in columns.items() if k in accepted}
            slots[name] = self._start(name, fn, prompts, completions, kw)
            slots[name]["kw"] = kw
        per_reward, errors, messages, times = {}, {}, {}, {}
        err_mask = torch.zeros(b, dtype=torch.bool)
        applied = torch.zeros(b, dtype=torch.bool)
        total = torch.zeros(b, dtype=torch.float64)
        for name, fn, weight in self.rewards:
            values, bad, msg, took = self._collect(slots[name], b, deadline)
            if slots[name].get("split") and b > 1 and not getattr(fn, "batch_dependent", False):
                values, bad, msg = self._score_alone(name, fn, prompts, completions, slots[name]["kw"])
                took = time.monotonic() - slots[name]["t0"]
            per_reward[name] = torch.tensor(
                [math.nan if v is None else v for v in values], dtype=torch.float32
            )
            times[name] = took
            errors[name] = int(bad.sum())
            if msg:
                messages[name] = msg
                logger.warning("reward %r failed on %d/%d samples: %s", name, errors[name], b, msg)
            err_mask |= bad
            for i, v in enumerate(values):
                if v is not None and not bad[i]:
                    total[i] += weight * v
                    applied[i] = True
        valid = applied & ~err_mask
        scores = torch.where(valid, total, torch.full_like(total, math.nan)).float()
        n_err = int(err_mask.sum())
        if b and n_err / b > self.max_error_rate:
            detail = "; ".join(f"{n}: {errors[n]} ({messages.get(n, '')})" for n in errors if errors[n])
            raise RewardError(
                f"rewards failed on {n_err}/{b} samples ({n_err / b:.0%} > max_error_rate {self.max_error_rate:.0%}): {detail}"
            )
        return RewardResult(scores, per_reward, valid, errors, messages, times)

    def close(self) -> None:
        """Release the rewards' resources (worker processes of e.g. the accuracy reward)."""
        for _, fn, _ in self.rewards:
            close = getattr(fn, "close", None)
            if callable(close):
                close()

    # ------------------------------------------------------------------ internals

    def _start(self, name, fn, prompts, completions, kw, on_done=None, gated: bool = True) -> dict:
        """Call fn in the background; the slot's "done" event is set (and on_done called)
        when it returns or raises."""
        slot: dict = {"done": threading.Event(), "t0": time.monotonic(), "cancel": threading.Event()}

        def finish(*_):
            slot["done"].set()
            if on_done is not None:
                on_done()

        if _is_async(fn):
            try:
                coro = fn(prompts, completions, **kw)
            except BaseException as e:
                slot["error"] = e
                finish()
                return slot
            fut = asyncio.run_coroutine_threadsafe(coro, _Loop.get())
            slot["future"] = fut
            fut.add_done_callback(finish)
            return slot

        def target():
            _call.cancel = slot["cancel"]
            with self._slots if gated else contextlib.nullcontext():
                try:
                    out = fn(prompts, completions, **kw)
                    if inspect.isawaitable(out):  # a plain callable that returned a coroutine
                        out = asyncio.run_coroutine_threadsafe(_await(out), _Loop.get()).result()
                    slot["value"] = out
                except BaseException as e:  # any failure of user code is the reward's error
                    slot["error"] = e
                finally:
                    finish()

        t = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
        slot["thread"] = t
        t.start()
        return slot

    def _abandon(self, slot: dict) -> None:
        slot["cancel"].set()
        if "future" in slot:
            slot["future"].cancel()
        else:
            self.abandoned_threads = [t for t in self.abandoned_threads if t.is_alive()] + [slot["thread"]]

    def _collect(self, slot: dict, b: int, deadline: float):
        """-> (values: list[float|None], bad: Tensor[B] bool, message, seconds).

        Marks the slot "split" when the whole call failed (timed out or raised), so that
        `score` re-scores its samples one by one.
        """
        finished = slot["done"].wait(timeout=max(0.0, deadline - time.monotonic()))
        took = time.monotonic() - slot["t0"]
        if not finished:
            self._abandon(slot)
            slot["split"] = True
            return [None] * b, torch.ones(b, dtype=torch.bool), f"timed out after {self.timeout_s:g}s", took
        values, bad, msg = self._outcome(slot, b)
        return values, bad, msg, took

    def _outcome(self, slot: dict, b: int):
        """Interpret a finished call: (values, bad [B] bool, first error message or None)."""
        all_bad = torch.ones(b, dtype=torch.bool)
        if "error" in slot:
            slot["split"] = True
            return [None] * b, all_bad, _one_line(slot["error"])
        if "future" in slot:
            try:
                out = slot["future"].result(timeout=0)
            except BaseException as e:
                slot["split"] = True
                return [None] * b, all_bad, _one_line(e)
        else:
            out = slot["value"]
        if isinstance(out, torch.Tensor):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            return [None] * b, all_bad, f"returned {type(out).__name__}, expected a list of {b} numbers"
        if len(out) != b:
            return [None] * b, all_bad, f"returned {len(out)} values for {b} samples"
        values: list[float | None] = []
        bad = torch.zeros(b, dtype=torch.bool)
        msg = None
        for i, v in enumerate(out):
            x = float(v) if isinstance(v, numbers.Real) else None
            if v is None:
                values.append(None)
            elif x is not None and math.isfinite(x) and abs(x) <= MAX_ABS_REWARD:
                values.append(x)
            else:
                values.append(None)
                bad[i] = True
                msg = msg or f"sample {i}: {v!r:.40} is not a number within ±{MAX_ABS_REWARD:g} or None"
        return values, bad, msg

    def _score_alone(self, name, fn, prompts, completions, kw):
        """Score each sample in a call of its own, `max_workers` at a time, each with its
        own `timeout_s` deadline; stops early once the error budget is exhausted."""
        b = len(completions)
        values: list[float | None] = [None] * b
        bad = torch.zeros(b, dtype=torch.bool)
        msg = None
        finished: queue.SimpleQueue = queue.SimpleQueue()
        pending, running = list(range(b)), {}  # i -> (slot, deadline)
        budget = self.max_error_rate * b
        while pending or running:
            while pending and len(running) < self.max_workers and int(bad.sum()) <= budget:
                i = pending.pop(0)
                one = {k: [v[i]] for k, v in kw.items()}
                slot = self._start(name, fn, [prompts[i]], [completions[i]], one,
                                   on_done=lambda i=i: finished.put(i), gated=False)  # fmt: skip
                running[i] = (slot, time.monotonic() + self.timeout_s)
            if not running:
                break
            try:
                done = [
                    finished.get(timeout=max(0.0, min(d for _, d in running.values()) - time.monotonic()))
                ]
            except queue.Empty:
                done = []
            now = time.monotonic()
            for i in [j for j, (sl, d) in running.items() if d <= now and not sl["done"].is_set()]:
                self._abandon(running.pop(i)[0])
                bad[i] = True
                msg = msg or f"sample {i}: timed out after {self.timeout_s:g}s"
            for i in done:
                if i not in running:
                    continue  # already expired
                v, one_bad, one_msg = self._outcome(running.pop(i)[0], 1)
                values[i], bad[i] = v[0], bool(one_bad[0])
                msg = msg or (f"sample {i}: {one_msg}" if one_msg else None)
        for i in pending:  # not tried: the batch already failed past max_error_rate
            bad[i] = True
        return values, bad, msg


async def _await(aw):
    return await aw


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
