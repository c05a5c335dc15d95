"""`posttrain <command> --nproc N`: start N local ranks of a torch.distributed run and watch them.

A minimal single-node launcher (what `torchrun --standalone --nproc-per-node N` does, minus
elastic restarts): each rank is `python -m posttrain <command> ...` with torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a
free local port). It exists so that a failure ends the job with ONE line:

- a rank that raises hands its message (and the phase it was in) to the launcher through a
  file in a private directory (POSTTRAIN_LAUNCH_DIR) instead of printing it;
- as soon as any rank exits non-zero, the others get `GRACE_S` seconds to notice (a failed
  collective) and are then stopped (SIGTERM, SIGKILL after `GRACE_S` more);
- the launcher prints `error: ...` naming the rank that failed first and how, plus the
  phase the job was in, and exits non-zero;
- each rank's stderr passes through the launcher (`StderrFilter`, one thread per rank) and
  reaches the user live, chunk by chunk (warnings, tracebacks, progress bars drawn with
  carriage returns), except lines in `NOISE`: what a C++ runtime prints while a process
  ends because a peer died (`terminate called without an active exception`, from a thread
  torn down inside a broken collective), which says nothing the verdict does not. The
  verdict is printed after every rank's stderr has been forwarded, so it is the last line.

Checkpoints are written atomically (every rank into a temp directory that rank 0 renames into
place, train/common/sharded_checkpoint.py), so stopping the job at any instant leaves the last
complete checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LAUNCH_DIR_ENV = "POSTTRAIN_LAUNCH_DIR"
GRACE_S = 5.0
POLL_S = 0.1
DRAIN_S = 2.0  # how long the verdict waits for a rank's stderr to end (a child may hold it open)
# Whole lines a rank's C++ runtime prints when it ends inside a broken collective.
NOISE = (b"terminate called without an active exception",)


def split_noise(buf: bytes) -> tuple[bytes, bytes]:
    """(what to forward now, what to hold) for the bytes `buf` read from a rank's stderr.

    Complete lines in NOISE are dropped; every other byte is forwarded at once, except an
    unfinished last line that may still become a NOISE line (held until it is complete).
    """
    out = []
    lines = buf.split(b"\n")
    for line in lines[:-1]:
        if line.rstrip(b"\r") not in NOISE:
            out.append(line + b"\n")
    tail = lines[-1]
    if tail and any(n.startswith(tail) for n in NOISE):
        return b"".join(out), tail
    out.append(tail)
    return b"".join(out), b""


class StderrFilter(threading.Thread):
    """Copies a rank's stderr pipe to `sink` (sys.stderr, or any binary stream) as it
    arrives, less NOISE."""

    def __init__(self, source, sink):
        super().__init__(daemon=True)
        self.fd, self.sink = source.fileno(), sink

    def run(self) -> None:
        held = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            out, held = split_noise(held + chunk)
            self._write(out)
        if held:  # a held prefix that never became a NOISE line: the rank's own bytes
            self._write(held)

    def _write(self, data: bytes) -> None:
        if data:
            binary = getattr(self.sink, "buffer", self.sink)  # sys.stderr's bytes underneath
            binary.write(data)
            binary.flush()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_to_launcher(message: str, phase: str) -> bool:
    """In a rank started by `launch`: store this rank's failure for the launcher; True if
    stored (the caller then prints nothing)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    rank = os.environ.get("RANK", "0")
    path = Path(folder) / f"rank-{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"message": message, "phase": phase}))
    os.replace(tmp, path)
    return True


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every rank still running, SIGKILL those alive GRACE_S later."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _drain(filters: list[StderrFilter]) -> None:
    """Wait (at most DRAIN_S in all) until the ranks' stderr has been forwarded."""
    deadline = time.monotonic() + DRAIN_S
    sys.stderr.flush()
    for f in filters:
        f.join(timeout=max(0.0, deadline - time.monotonic()))


def launch(argv: list[str], nproc: int) -> int:
    """Run `posttrain *argv` on `nproc` local ranks; the job's exit status."""
    folder = tempfile.mkdtemp(prefix="posttrain-launch-")
    port = free_port()
    procs: list[subprocess.Popen] = []
    filters: list[StderrFilter] = []
    try:
        for rank in range(nproc):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       **{LAUNCH_DIR_ENV: folder})  # fmt: skip
            procs.append(
                subprocess.Popen([sys.executable, "-m", "posttrain", *argv], env=env, stderr=subprocess.PIPE)
            )
            filters.append(StderrFilter(procs[-1].stderr, sys.stderr))
            filters[-1].start()
        order: list[int] = []  # ranks in the order their failure was seen
        deadline = None
        while True:
            codes = [p.poll() for p in procs]
            order += [r for r, c in enumerate(codes) if c not in (None, 0) and r not in order]
            if all(c is not None for c in codes):
                break
            if order and deadline is None:
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        stopped = {r for r, p in enumerate(procs) if p.poll() is None}
        _stop(procs)
        codes = [p.wait() for p in procs]
        _drain(filters)
        order += [r for r, c in enumerate(codes) if c != 0 and r not in order and r not in stopped]
        if not order:
            return 0
        rank, message = _message(Path(folder), order, codes)
        sys.stderr.write(f"error: {message}\n")
        return 2 if codes[rank] == 2 else 1
    except KeyboardInterrupt:
        _stop(procs)
        _drain(filters)
        sys.stderr.write("error: interrupted\n")
        return 130
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)


def _message(folder: Path, order: list[int], codes: list[int]) -> tuple[int, str]:
    """(root rank, one line): the first failed rank that did not merely lose contact with the
    others — its own message, else how it ended and the phase the others were in."""
    reports = {}
    for r in range(len(codes)):
        f = folder / f"rank-{r}.json"
        if f.is_file():
            try:
                reports[r] = json.loads(f.read_text())
            except ValueError:
                pass
    root = next((r for r in order if "lost contact" not in reports.get(r, {}).get("message", "")), order[0])
    if root in reports:  # its own words; "lost contact" only when no rank said more (a hang)
        return root, reports[root]["message"]
    phases = [rep["phase"] for r, rep in sorted(reports.items()) if r != root]
    during = f" during {phases[0]}" if phases else ""
    return root, (
        f"rank {root} {_how(codes[root])}{during}; the job was stopped "
        "(the last complete checkpoint stays loadable)"
    )
