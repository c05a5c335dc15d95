"""The sandbox's per-run uids and resource limits (see `posttrain.data.sandbox`).

As root, each run drops to its own uid so that RLIMIT_NPROC (ignored for root) and the
final kill-every-process-of-the-uid sweep concern that run only. The limits are applied by
exec'ing through util-linux `prlimit`, or between fork and exec where it is missing.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.data.sandbox import SandboxLimits

# ---------------------------------------------------------------- uid allocation

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uid_cursor = (os.getpid() * 7919) % 4096


def _acquire_uid(base: int, span: int) -> int:
    """A uid no other live run of this process uses, so per-uid limits and the final
    kill-all-of-uid sweep touch only this run. (Runs in other processes may collide; the
    pid namespace backends do not rely on the sweep.)"""
    global _uid_cursor
    with _uid_lock:
        # Rotate rather than reuse: killed processes of a previous run may linger as
        # zombies until reaped and would still count against the next run's RLIMIT_NPROC.
        for _ in range(span):
            _uid_cursor = (_uid_cursor + 1) % span
            uid = base + _uid_cursor
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError("sandbox: no free uid")


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _kill_uid(uid: int) -> None:
    """Kill every process owned by `uid` (catches programs that escaped the process group
    with setsid when no pid namespace contains them)."""
    if os.geteuid() != 0:
        return
    for _ in range(3):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        if not found:
            return
        time.sleep(0.01)


# ---------------------------------------------------------------- resource limits


def _rlimit_values(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    mb = 1 << 20
    cpu = max(1, int(limits.cpu_time_s))
    return {
        "cpu": (cpu, cpu + 1),  # soft: SIGXCPU; hard one second later: SIGKILL
        "as": (limits.memory_mb * mb,) * 2,
        "fsize": (limits.file_size_mb * mb,) * 2,
        "nofile": (limits.max_open_files,) * 2,
        "core": (0, 0),
        "nproc": (_nproc_budget(limits.max_processes),) * 2,
    }


def _nproc_budget(max_processes: int) -> int:
    """RLIMIT_NPROC counts *all* processes of the uid. As root each run has a fresh uid, so
    the budget is the run's own; as an ordinary user the program shares the uid with the
    user's other processes, so the budget is added on top of what already runs."""
    if os.geteuid() == 0:
        return max_processes
    mine = 0
    for entry in os.listdir("/proc"):
        try:
            mine += entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == os.geteuid()
        except OSError:
            continue
    return mine + max_processes


def _prlimit_prefix(limits: SandboxLimits) -> list[str] | None:
    """Limits applied by exec'ing through util-linux prlimit (no Python code between fork
    and exec, which `preexec_fn` would need and which is unsafe in a threaded caller)."""
    tool = shutil.which("prlimit")
    if tool is None:
        return None
    return [tool, *(f"--{k}={soft}:{hard}" for k, (soft, hard) in _rlimit_values(limits).items()), "--"]


def _preexec(limits: SandboxLimits):
    """Fallback when prlimit is missing: set the same limits between fork and exec."""
    names = {"cpu": "RLIMIT_CPU", "as": "RLIMIT_AS", "fsize": "RLIMIT_FSIZE", "nofile": "RLIMIT_NOFILE"}
    names.update(core="RLIMIT_CORE", nproc="RLIMIT_NPROC")
    values = [(getattr(resource, names[k]), v) for k, v in _rlimit_values(limits).items()]

    def apply() -> None:
        for res, v in values:
            resource.setrlimit(res, v)

    return apply
