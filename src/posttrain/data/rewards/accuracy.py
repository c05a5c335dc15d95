"""The "accuracy" reward: math-verify in persistent worker processes with a hard budget.

`MathVerifyPool` keeps `num_workers` Python processes that have already imported
math-verify/sympy (start-up ≈ 1 s is paid once, a check then costs a pipe round trip plus
the comparison). Each check has a hard wall-clock budget: when it runs over, the worker is
SIGKILLed and a replacement is started in the background. No signals are used in the
calling process, so it works identically from the main thread, worker threads and asyncio
(via a thread), and leaves the caller's SIGALRM / event-loop timers alone.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from posttrain.data.rewards import math_verifier
from posttrain.data.rewards.runner import cancel_event
from posttrain.errors import RewardError

logger = logging.getLogger(__name__)
_WORKER_SCRIPT = str(Path(math_verifier.__file__).resolve())


class _Worker:
    def __init__(self, memory_mb: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER_SCRIPT, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own group: a kill never reaches the caller
        )
        self.ready = False

    def read_frame(self, deadline: float) -> dict | None:
        """One reply frame, or None if `deadline` (monotonic) passes or the worker dies."""
        fd = self.proc.stdout.fileno()
        buf = b""
        need = 4
        length = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            r, _, _ = select.select([fd], [], [], remaining)
            if not r:
                return None
            chunk = os.read(fd, max(need - len(buf), 1))
            if not chunk:
                return None
            buf += chunk
            if length is None and len(buf) >= 4:
                length = struct.unpack(">I", buf[:4])[0]
                buf = buf[4:]
                need = length
            if length is not None and len(buf) >= length:
                import json

                return json.loads(buf[:length])

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class _StartFailed(Exception):
    def __init__(self, replacement: _Worker, message: str):
        super().__init__(message)
        self.replacement = replacement


class MathVerifyPool:
    """Persistent, killable math-verify workers.

    num_workers: processes (= checks in flight at once).
    budget_s: hard wall-clock budget per check; past it the worker is killed and the check
        returns `timeout_score`.
    memory_mb: RLIMIT_AS for each worker (an answer like 9^{9^{9^9}} must not eat the host).
    startup_timeout_s: how long a fresh worker may take to import math-verify; a worker
        that cannot start is an infrastructure failure (RewardError), not a score.
    timeout_score, error_score: the score of an answer whose check ran past the budget /
        crashed the parser (0.0: unverifiable answers are not correct; None would exclude
        the sample from this reward instead).
    check_options: passed to `math_verifier.check` (exact_check, exact_rtol, float_rtol).
    """

    def __init__(
        self,
        num_workers: int = 2,
        budget_s: float = 1.0,
        *,
        memory_mb: int = 2048,
        startup_timeout_s: float = 60.0,
        timeout_score: float | None = 0.0,
        error_score: float | None = 0.0,
        **check_options,
    ):
        if num_workers < 1 or budget_s <= 0:
            raise ValueError(
                f"MathVerifyPool needs num_workers >= 1 and budget_s > 0, got {num_workers}, {budget_s}"
            )
        self.budget_s = float(budget_s)
        self.memory_mb = int(memory_mb)
        self.startup_timeout_s = float(startup_timeout_s)
        self.timeout_score = timeout_score
        self.error_score = error_score
        self.check_options = dict(check_options)
        self.stats = {"checks": 0, "timeouts": 0, "errors": 0, "restarts": 0, "unparsed_gold": 0}
        self._stats_lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._closed = False
        for _ in range(num_workers):
            self._spawn()
        weakref.finalize(self, MathVerifyPool._kill_all, self._all)

    def _spawn(self) -> None:
        w = _Worker(self.memory_mb)
        self._all.append(w)
        self._idle.put(w)

    @staticmethod
    def _kill_all(workers: list[_Worker]) -> None:
        for w in list(workers):
            w.kill()

    def close(self) -> None:
        """Kill every worker. Idempotent."""
        self._closed = True
        self._kill_all(self._all)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def wait_ready(self) -> None:
        """Block until every worker has imported math-verify (e.g. before a timed RL step;
        otherwise a check waits for a fresh worker's start-up, outside its budget)."""
        taken = [self._idle.get() for _ in range(len(self._all))]
        try:
            for i, w in enumerate(taken):
                try:
                    taken[i] = self._ensure_ready(w)
                except _StartFailed as e:
                    taken[i] = e.replacement
                    raise RewardError(str(e)) from None
        finally:
            for w in taken:
                self._idle.put(w)

    def _ensure_ready(self, w: _Worker) -> _Worker:
        """w once it has announced readiness; a worker that never does is replaced and
        the caller gets RewardError (an infrastructure failure, not a score)."""
        if w.ready:
            return w
        hello = w.read_frame(time.monotonic() + self.startup_timeout_s)
        if hello and hello.get("ready"):
            w.ready = True
            return w
        w.kill()
        w = self._replace(w)
        raise _StartFailed(w, f"math-verify worker failed to start within {self.startup_timeout_s:.0f}s")

    def check(self, gold: str, completion: str, *, think_open: bool = False) -> float | None:
        """Score one completion against `gold` within the budget (thread-safe)."""
        if self._closed:
            raise RewardError("math-verify pool is closed")
        w = self._idle.get()
        try:
            try:
                w = self._ensure_ready(w)
            except _StartFailed as e:
                w = e.replacement
                raise RewardError(str(e)) from None
            request = {
                "gold": gold,
                "completion": completion,
                "options": {**self.check_options, "think_open": think_open},
            }
            self._count("checks")
            t0 = time.monotonic()
            try:
                math_verifier.write_frame(w.proc.stdin, request)
                reply = w.read_frame(t0 + self.budget_s)
            except (BrokenPipeError, OSError, ValueError):
                reply = None
            if reply is None:
                # Past the budget (or the worker died, e.g. on its memory cap): replace it.
                self._count("timeouts")
                w.kill()
                w = self._replace(w)
                return self.timeout_score
            if "error" in reply:
                self._count("errors")
                return self.error_score
            if reply["score"] is None:
                self._count("unparsed_gold")
                logger.warning(
                    "accuracy: cannot parse the ground-truth answer %.80r; sample not scored", gold
                )
                return None
            return float(reply["score"])
        finally:
            self._idle.put(w)

    def _replace(self, dead: _Worker) -> _Worker:
        self._count("restarts")
        if dead in self._all:
            self._all.remove(dead)
        w = _Worker(self.memory_mb)  # starts importing now; readiness is awaited on next use
        self._all.append(w)
        return w

    def check_many(
        self, golds: list[str], completions: list[str], think_open: list[bool] | None = None
    ) -> list:
        """Score B completions in parallel over the workers; each check has its own budget.

        Stops taking new completions once the reward runner has given up on the call
        (`runner.cancel_event`), so an abandoned batch frees the workers."""
        n = len(completions)
        think_open = think_open or [False] * n
        out: list = [None] * n
        if n == 0:
            return out
        next_index = iter(range(n))
        lock = threading.Lock()
        failure: list[BaseException] = []
        cancel = cancel_event()  # set when the reward runner gave up on this call

        def drain() -> None:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None or failure or (cancel is not None and cancel.is_set()):
                    return
                try:
                    out[i] = self.check(golds[i], completions[i], think_open=think_open[i])
                except BaseException as e:  # surfaced in the caller's thread below
                    failure.append(e)
                    return

        threads = [threading.Thread(target=drain, daemon=True) for _ in range(min(len(self._all), n))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failure:
            raise failure[0]
        return out


class AccuracyReward:
    """f(prompts, completions, answer=[...], **columns) -> list[float | None].

    1.0 when the completion's final answer equals the row's ground truth (column
    `answer_column`), 0.0 otherwise; None for rows without a ground truth (not applicable).
    A prompt ending in ``<think>`` means the completion starts inside the reasoning.
    See `MathVerifyPool` for the options.
    """

    def __init__(
        self, *, answer_column: str = "answer", num_workers: int = 2, budget_s: float = 1.0, **pool_options
    ):
        self.answer_column = answer_column
        self.pool = MathVerifyPool(num_workers=num_workers, budget_s=budget_s, **pool_options)

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float | None]:
        if self.answer_column not in columns:
            raise RewardError(f"accuracy reward needs a column {self.answer_column!r}; got {sorted(columns)}")
        answers = columns[self.answer_column]
        todo = [i for i, a in enumerate(answers) if a is not None and str(a).strip()]
        think_open = [_prompt_opens_think(prompts[i]) for i in todo]
        scores = self.pool.check_many(
            [str(answers[i]) for i in todo], [completions[i] for i in todo], think_open
        )
        out: list[float | None] = [None] * len(completions)
        for i, s in zip(todo, scores):
            out[i] = s
        return out

    def close(self) -> None:
        self.pool.close()


def _prompt_opens_think(prompt) -> bool:
    """True when the prompt (chat-templated text) ends inside an opened <think> block."""
    return isinstance(prompt, str) and prompt.rstrip().endswith("<think>")
