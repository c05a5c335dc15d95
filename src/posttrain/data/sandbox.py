"""Run model-generated Python programs in a contained, disposable process.

Every run gets a fresh process in its own session, an empty temporary working directory,
an empty environment, resource limits and a wall-clock deadline; stdout/stderr are capped.
Isolation backends, strongest first (chosen by `detect_backend`, or forced by `backend=`):

- ``"bwrap"``: bubblewrap with every namespace unshared (no network, its own pid
  namespace) and the minimal root of `posttrain.data.sandbox_mounts` (read-only system
  directories and interpreter, a private size-capped /tmp as the only writable place, no
  host home, no host sockets), started under the run's unprivileged uid (as root we drop
  to it with ``setpriv`` before bwrap).
- ``"unshare"``: util-linux ``unshare`` (mount, net, pid, ipc, uts namespaces) building the
  same minimal root with a shell script and ``pivot_root``, then ``setpriv`` to drop to an
  unprivileged uid (as an ordinary user: to no capabilities) with ``no_new_privs``. Needs
  root or unprivileged user namespaces.
- ``"rlimits"``: resource limits, a new session, an unprivileged uid when we are root, and
  nothing else (network, host files and total disk use are NOT isolated). Used only when
  neither tool works; a warning is logged once.

With a pid namespace, the program is pid 1 of its namespace: when it exits or we kill the
launcher, the kernel kills every process it left behind (fork bombs included). Without one
we kill the process group and, when we dropped to a per-run uid, every process of that uid.

Verdicts (`run_tests`) compare the program's stdout *text*, parsed in the parent after
the program has exited, with the expected output: nothing the untrusted code constructs
(objects, exit codes, "PASSED" banners) is ever trusted. A failure of the sandbox itself is
reported as status ``"sandbox_error"``, never as a wrong answer.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from posttrain.data.sandbox_limits import _acquire_uid, _kill_uid, _preexec, _prlimit_prefix, _release_uid
from posttrain.data.sandbox_mounts import (  # noqa: F401 - _MOUNT_SCRIPT, _unshare_prefix: tests
    _MOUNT_SCRIPT,
    _bwrap_args,
    _setpriv_prefix,
    _unshare_prefix,
    command,
    unshare_setup,
)

logger = logging.getLogger(__name__)

STATUSES = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "timeout",
    "memory",
    "output_limit",
    "sandbox_error",
)
BACKENDS = ("bwrap", "unshare", "rlimits")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Every field is a hard cap enforced by the kernel or the parent.

    cpu_time_s: RLIMIT_CPU (SIGXCPU, then SIGKILL one second later).
    wall_time_s: the parent kills the whole run after this many seconds of wall clock.
    memory_mb: RLIMIT_AS, the address-space cap (Python raises MemoryError past it).
    file_size_mb: RLIMIT_FSIZE, the largest file the program may write.
    max_open_files: RLIMIT_NOFILE.
    max_processes: RLIMIT_NPROC for the run's uid (threads count too).
    max_output_bytes: stdout and stderr are each cut at this size and the run is killed.
    disk_mb: everything the program may write in total (work dir, home, /tmp: one private
        tmpfs of this size, plus 1 MiB of /dev/shm), never on the host's disk; bwrap and
        unshare only — the rlimits fallback has no private filesystem (see the module doc).
    """

    cpu_time_s: int = 2
    wall_time_s: float = 4.0
    memory_mb: int = 512
    file_size_mb: int = 16
    max_open_files: int = 64
    max_processes: int = 32
    max_output_bytes: int = 1 << 20
    disk_mb: int = 64


@dataclass
class RunResult:
    """Outcome of one program run (before any comparison with expected output).

    status: "ok" when the program exited 0, else one of "runtime_error", "timeout",
        "memory", "output_limit", "sandbox_error".
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    backend: str


@dataclass
class TestReport:
    """Verdict of a program on a list of tests.

    status: "passed" iff every test passed, else the status of the first failing test.
    passed/total: counts; score: passed / total (1.0 iff status == "passed").
    """

    status: str
    passed: int
    total: int
    results: list[dict] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


# ---------------------------------------------------------------- backend detection

_backend_cache: dict[str, str] = {}
_detect_lock = threading.Lock()


def _probe(cmd: list[str]) -> bool:
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _probe_in_workdir(make_cmd) -> bool:
    """Run make_cmd(workdir) in a scratch work dir holding an empty main.py."""
    probe_dir = tempfile.mkdtemp(prefix="posttrain-sandbox-probe-")
    os.chmod(probe_dir, 0o755)
    try:
        with open(os.path.join(probe_dir, "main.py"), "w") as f:
            f.write("")
        os.chmod(os.path.join(probe_dir, "main.py"), 0o644)
        try:
            r = subprocess.run(make_cmd(probe_dir), cwd=probe_dir, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def _probe_bwrap(bwrap: str, true: str) -> bool:
    python = default_python()
    return _probe_in_workdir(lambda d: _setpriv_prefix(65534) + [bwrap, *_bwrap_args(d, 1, python), true])


def _probe_unshare(true: str) -> bool:
    """Whether the unshare backend can build its minimal root here (root, or unprivileged
    user namespaces)."""
    return _probe_in_workdir(lambda d: unshare_setup(1, default_python(), None) + [true])


def detect_backend() -> str:
    """Return the strongest isolation backend that works on this machine (cached).

    Probes by actually running ``true`` under each tool, because a tool can be installed
    and still be refused by the kernel (e.g. user namespaces disabled in a container).
    """
    with _detect_lock:
        if "auto" in _backend_cache:
            return _backend_cache["auto"]
        choice = "rlimits"
        true = shutil.which("true") or "/bin/true"
        bwrap = shutil.which("bwrap")
        if bwrap and _probe_bwrap(bwrap, true):
            choice = "bwrap"
        elif shutil.which("unshare") and _probe_unshare(true):
            choice = "unshare"
        else:
            logger.warning(
                "sandbox: neither bubblewrap nor unshare works here; falling back to rlimits only "
                "(no network or filesystem isolation). Install bubblewrap for full isolation."
            )
        _backend_cache["auto"] = choice
        return choice


# ---------------------------------------------------------------- running


def _world_executable(path: str) -> bool:
    """True when an unprivileged stranger can reach and execute `path` by mode bits (every
    ancestor directory o+x, the file o+rx)."""
    import stat

    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IXOTH | stat.S_IROTH) != (stat.S_IXOTH | stat.S_IROTH):
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(d)
            if parent == d:
                return True
            d = parent
    except OSError:
        return False


def default_python() -> str:
    """The interpreter sandboxed programs run on: this one if an unprivileged uid may
    execute it, else the system python3 (the program only gets the standard library)."""
    for cand in (os.path.realpath(sys.executable), shutil.which("python3") or "", "/usr/bin/python3"):
        if cand and _world_executable(os.path.realpath(cand)):
            return os.path.realpath(cand)
    return os.path.realpath(sys.executable)


def run_program(
    code: str,
    stdin: str = "",
    *,
    limits: SandboxLimits = SandboxLimits(),
    backend: str = "auto",
    python: str | None = None,
    uid_base: int = 60000,
    uid_span: int = 4096,
) -> RunResult:
    """Run `code` (a Python program) once with `stdin`, contained; never raises for
    anything the program does.

    backend: "auto" (see `detect_backend`), "bwrap", "unshare" or "rlimits".
    python: interpreter for the program (default: `default_python()`), run with -I -S so
        only the standard library is importable.
    uid_base, uid_span: when running as root, each run drops to its own uid in
        [uid_base, uid_base + uid_span) so RLIMIT_NPROC (ignored for root) and the final
        kill sweep are per run.
    Returns within ``limits.wall_time_s`` plus the kill/reap time (well under 1 s).
    """
    backend = detect_backend() if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"sandbox backend {backend!r} is not one of {', '.join(BACKENDS)}")
    python = python or default_python()
    t0 = time.monotonic()
    uid = _acquire_uid(uid_base, uid_span) if os.geteuid() == 0 else os.geteuid()
    workdir = None
    start_r = start_w = -1
    proc = None
    try:
        workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if os.geteuid() == 0:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
        start_r, start_w = os.pipe()
        # The launcher tools (unshare, sh, setpriv) run under the same caps; they are small.
        prefix = _prlimit_prefix(limits)
        proc = subprocess.Popen(
            (prefix or []) + command(backend, python, workdir, uid, start_w, limits.disk_mb),
            pass_fds=(start_w,),
            cwd=workdir,
            env={},  # empty environment: nothing of the parent's leaks in
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=None if prefix else _preexec(limits),
            close_fds=True,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        _close_fds(start_r, start_w)
        _cleanup(proc, workdir, uid)
        return RunResult(
            "sandbox_error", None, "", f"sandbox failed to start: {e}", time.monotonic() - t0, backend
        )
    os.close(start_w)
    try:
        status, out, err = _communicate(proc, stdin.encode("utf-8", "replace"), limits, t0)
    except Exception as e:  # an infrastructure fault, not the program's verdict
        _close_fds(start_r)
        _cleanup(proc, workdir, uid)
        return RunResult(
            "sandbox_error", None, "", f"sandbox I/O failed: {e}", time.monotonic() - t0, backend
        )
    rc = proc.returncode
    _cleanup(proc, workdir, uid)
    os.set_blocking(start_r, False)
    try:
        started = os.read(start_r, 1) == b"S"
    except BlockingIOError:
        started = False
    _close_fds(start_r)
    stderr = err.decode("utf-8", "replace")
    if not started and status != "timeout":
        msg = f"sandbox ({backend}) failed before the program started (exit {rc}): {stderr.strip()[-300:]}"
        return RunResult("sandbox_error", rc, "", msg, time.monotonic() - t0, backend)
    if status is None:
        status = _classify(rc, stderr, limits, time.monotonic() - t0)
    return RunResult(status, rc, out.decode("utf-8", "replace"), stderr, time.monotonic() - t0, backend)


def _communicate(
    proc: subprocess.Popen, data: bytes, limits: SandboxLimits, t0: float, drain_grace_s: float = 0.2
):
    """Feed stdin and drain stdout/stderr with caps and a deadline; kill on violation.

    Returns (forced_status | None, stdout_bytes, stderr_bytes)."""
    deadline = t0 + limits.wall_time_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    view = memoryview(data)
    status = None
    open_readers = 2
    drain_until = None
    while open_readers:
        now = time.monotonic()
        if drain_until is None and proc.poll() is not None:
            # The program exited but something it spawned still holds the pipes (only
            # possible without a pid namespace): drain briefly, then it gets killed.
            drain_until = now + drain_grace_s
        if drain_until is not None and now >= drain_until:
            break
        remaining = deadline - now
        if remaining <= 0:
            status = "timeout"
            break
        for key, _ in sel.select(timeout=min(remaining, 0.1)):
            if key.fileobj is proc.stdin:
                try:
                    n = os.write(proc.stdin.fileno(), view[:65536])
                    view = view[n:]
                except (BrokenPipeError, BlockingIOError, OSError):
                    view = view[:0]
                if not view:
                    sel.unregister(proc.stdin)
                    proc.stdin.close()
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_readers -= 1
                continue
            buf = bufs[key.fd]
            buf += chunk
            if len(buf) > limits.max_output_bytes:
                del buf[limits.max_output_bytes :]
                status = "output_limit"
        if status:
            break
    sel.close()
    if status:
        _kill(proc)
    try:
        proc.wait(timeout=max(0.05, deadline - time.monotonic()) if not status else 2.0)
    except subprocess.TimeoutExpired:
        status = "timeout"
        _kill(proc)
        proc.wait(timeout=2.0)
    return status, bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()])


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(rc: int | None, stderr: str, limits: SandboxLimits, wall: float) -> str:
    """Type a finished run from its exit status (negative: killed by that signal; 128+n: a
    signal death reported through the unshare launcher's shell) and its stderr tail."""
    if rc == 0:
        return "ok"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"  # the soft CPU limit
    if rc in (-signal.SIGKILL, 128 + signal.SIGKILL):
        # Not our kill (that is typed where it happens): the kernel's SIGKILL at the hard CPU
        # limit (a program that ignored SIGXCPU has used up its CPU time) or the OOM killer.
        return "timeout" if wall >= limits.cpu_time_s else "memory"
    return "runtime_error"


def _cleanup(proc: subprocess.Popen | None, workdir: str | None, uid: int) -> None:
    if proc is not None:
        _kill(proc)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
    if os.geteuid() == 0 and uid != 0:
        _kill_uid(uid)
        _release_uid(uid)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- tests


def normalize_output(text: str) -> list[str]:
    """Canonical form of program output for comparison: trailing whitespace stripped from
    every line and trailing blank lines dropped (the usual judge tolerance). Nothing else
    is forgiven: a prefix of the expected output is a wrong answer."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def run_tests(
    code: str,
    tests: list[dict],
    *,
    limits: SandboxLimits = SandboxLimits(),
    backend: str = "auto",
    stop_on_failure: bool = True,
    python: str | None = None,
) -> TestReport:
    """Judge `code` on stdin/stdout tests: one fresh sandboxed run per test.

    tests: [{"input": str, "output": str}, ...]. A test passes iff the run exited 0 and its
    normalized stdout equals the normalized expected output (`normalize_output`).
    stop_on_failure: skip the remaining tests after the first failure (they count as not
        passed), which bounds a bad program's cost at one deadline.
    A sandbox failure makes the whole report "sandbox_error" so callers can tell an
    infrastructure fault from a wrong program.
    """
    results = []
    passed = 0
    first_fail = None
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise ValueError(f"test {i} must be a dict with 'input' and 'output' strings, got {t!r:.80}")
        run = run_program(code, str(t["input"]), limits=limits, backend=backend, python=python)
        if run.status == "sandbox_error":
            return TestReport(
                "sandbox_error", 0, len(tests), results + [{"status": run.status, "stderr": run.stderr}]
            )
        if run.status == "ok":
            ok = normalize_output(run.stdout) == normalize_output(str(t["output"]))
            status = "passed" if ok else "wrong_answer"
        else:
            status = run.status
        results.append({"status": status, "wall_s": run.wall_s, "stderr": run.stderr[-500:]})
        if status == "passed":
            passed += 1
        elif first_fail is None:
            first_fail = status
            if stop_on_failure:
                break
    return TestReport(first_fail or "passed", passed, len(tests), results)
