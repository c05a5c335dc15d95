"""Run directories: one run at a time, and nothing changed before a run is ready to train.

Promises (docs/guarantees.md):

- `run_lock(dir)` holds an exclusive `flock` on ``dir/.posttrain.lock`` for as long as a
  run uses the directory. A second run, or a ``--resume`` while the first is alive, is
  refused with a one-line error naming the holder's pid. The kernel drops the lock when
  the holder's process dies (even by kill -9), so no stale lock is ever left behind. The
  lock is re-entrant inside one process (the CLI and the training loop both take it).
- `check_output_dir(dir)` turns "is a file", "cannot be created" and "read-only" into a
  one-line `ConfigError` naming the directory, before any model is built.
- `resume_point(ckpt, resume)` refuses a ``--resume`` that finds a run (metrics or
  checkpoint files) but no complete checkpoint, instead of silently restarting at step 0.
- `begin_run(dir, cfg, resumed)` is the single point where a training loop starts
  modifying a run directory: it is called after the data, the models and any checkpoint
  have loaded, writes config.yaml and, for a fresh run, removes what a previous run left
  (its checkpoints, final models and summary) so old and new never mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, TrainingError

LOCK_FILE = ".posttrain.lock"
# What a fresh run replaces; metrics.jsonl / samples.jsonl are emptied by MetricsLogger.
_PREVIOUS_OUTPUTS = ("checkpoints", "final", "final_critic", "summary.json")

_held: dict[str, list[int]] = {}  # realpath -> [fd, depth]


def check_output_dir(path: str | os.PathLike, key: str = "run.output_dir") -> Path:
    """Create `path` if needed; a one-line ConfigError when it is a file or not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create directory {p} ({e.strerror or e})") from None
    probe = p / f".posttrain-write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: directory {p} is not writable ({e.strerror or e})") from None
    return p


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, key: str = "run.output_dir") -> Iterator[Path]:
    """Hold the run directory's lock for the duration of the block (see the module doc)."""
    created = not Path(path).exists()
    p = check_output_dir(path, key)
    real = os.path.realpath(p)
    if real in _held:
        _held[real][1] += 1
        try:
            yield p
        finally:
            _held[real][1] -= 1
        return
    fd = _acquire(p, key)
    _held[real] = [fd, 1]
    try:
        yield p
    finally:
        _held.pop(real, None)
        if created and os.listdir(p) == [LOCK_FILE]:
            # A command that failed before writing anything leaves no empty directory behind.
            os.unlink(p / LOCK_FILE)
            with contextlib.suppress(OSError):
                p.rmdir()
        os.close(fd)  # releases the flock


def _acquire(p: Path, key: str) -> int:
    """Open and flock p/LOCK_FILE (retrying when the file was removed meanwhile); the fd."""
    while True:
        try:
            fd = os.open(p / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"{key}: cannot create the lock file in {p} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{key}: cannot lock {p} ({e.strerror or e})") from None
            raise ConfigError(
                f"{key}: {p} is in use by another posttrain run (pid {holder}); "
                "wait for it to finish or choose another directory"
            ) from None
        try:
            same = os.stat(p / LOCK_FILE).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file: lock the one that exists now
        check_output_dir(p, key)


def has_previous_run(run_dir: str | os.PathLike) -> bool:
    """True when `run_dir` holds metrics rows or anything under checkpoints/."""
    d = Path(run_dir)
    metrics = d / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    ckpts = d / "checkpoints"
    return ckpts.is_dir() and any(ckpts.iterdir())


def resume_point(ckpt: Any, resume: bool) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run (resume False, or resume
    of a directory without any previous run); raises TrainingError when resume finds a
    previous run but no complete checkpoint (restarting would wipe its metrics)."""
    if not resume:
        return None
    latest = ckpt.latest()
    if latest is None and has_previous_run(ckpt.run_dir):
        raise TrainingError(
            f"run.resume: {ckpt.run_dir} holds a previous run but no complete checkpoint to resume "
            "from; refusing to restart it from step 0 (run without --resume to start over)"
        )
    return latest


def _written_by_posttrain(d: Path) -> bool:
    """True when `d` holds the config.yaml of a posttrain command (a mapping with `run`, or
    `output_dir` for eval)."""
    import yaml

    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and (isinstance(cfg.get("run"), dict) or "output_dir" in cfg)


def begin_run(run_dir: str | os.PathLike, cfg: Any, *, resumed: bool) -> None:
    """Start writing into `run_dir` (everything is validated and loaded by now).

    Writes config.yaml (atomically) so a crashed run records what it was asked to do; a
    fresh run first removes the previous run's checkpoints, final models and summary.
    """
    from posttrain.train.config.loader import save_config

    d = Path(run_dir)
    if not resumed:
        present = [name for name in _PREVIOUS_OUTPUTS if (d / name).exists() or (d / name).is_symlink()]
        if present and not _written_by_posttrain(d):
            raise ConfigError(
                f"run.output_dir: {d} holds {', '.join(present)} that no posttrain run wrote (no "
                "config.yaml of one); refusing to replace them — choose another directory"
            )
        for name in present:
            target = d / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    save_config(cfg, d / "config.yaml")
