"""Fast paths that are not taken are said once and counted, never silent.

A fast path (shared-prompt scoring, SDPA attention, KV-cache continuation between the
turns of a multi-turn rollout, ...) that a model should support but
does not get costs speed without changing any number, so nothing else would notice: an
upstream rename once made shared-prompt scoring fall back on every step of every run
(issue #15). Each place that gives up a fast path calls `record_fallback(path, reason)`:
the first time per (path, reason) a warning names the reason, and every time a counter
goes up. Training loops report the counters as ``perf/fallback_<path>`` metrics
(`fallback_counts`), so a run's metrics.jsonl shows how often each path was missed.

Where a fast path does not apply by construction (a batch whose prompts do not repeat
enough for sharing to pay off), nothing is recorded: that is a plan, not a fallback.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("posttrain.fastpath")

# Every fast path that reports misses; metrics rows carry all of them (0 when taken).
FAST_PATHS = ("shared_prompts", "sdpa", "kv_continuation")

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_warned: set[tuple[str, str]] = set()


def record_fallback(path: str, reason: str) -> None:
    """Count one miss of fast path `path` (one of FAST_PATHS); warn once per distinct `reason`."""
    if path not in FAST_PATHS:
        raise ValueError(f"unknown fast path {path!r}; known: {', '.join(FAST_PATHS)}")
    with _lock:
        _counts[path] += 1
        first = (path, reason) not in _warned
        _warned.add((path, reason))
    if first:
        log.warning(
            "fast path %r not taken: %s (warned once; counted as perf/fallback_%s)", path, reason, path
        )


def fallback_counts() -> dict[str, int]:
    """Misses per fast path since the process started (or since `reset_fallbacks`)."""
    with _lock:
        return dict(_counts)


def fallback_metrics(since: dict[str, int] | None = None) -> dict[str, float]:
    """``perf/fallback_<path>`` for every path of FAST_PATHS: misses since the snapshot `since`."""
    since, now = since or {}, fallback_counts()
    return {f"perf/fallback_{k}": float(now.get(k, 0) - since.get(k, 0)) for k in FAST_PATHS}


def reset_fallbacks() -> None:
    """Forget counts and warnings (tests)."""
    with _lock:
        _counts.clear()
        _warned.clear()


__all__ = ["FAST_PATHS", "fallback_counts", "fallback_metrics", "record_fallback", "reset_fallbacks"]
