"""Metrics and sample logging: metrics.jsonl (one row per step), samples.jsonl, optional
TensorBoard / Weights & Biases, and a tqdm progress bar.

A row is written with a single `write` of one complete line on an O_APPEND descriptor
and fsynced, so a crash leaves at most the rows already written, never half a row;
`read_jsonl` also tolerates a torn final line from a file written by other tools.
Non-finite values (a skipped NaN step) are written as JSON null to keep the file valid JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a missing file is []; an unparsable line (torn write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _truncate_after(path: Path, resume_step: int) -> None:
    """Keep only complete rows with step <= resume_step (temp file + atomic rename)."""
    if not path.is_file():
        return
    keep = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for r in keep:
            fh.write(json.dumps(r) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _scalar(key: str, value: Any) -> float | int | None:
    if hasattr(value, "item"):  # torch / numpy scalars
        if getattr(value, "numel", lambda: 1)() != 1:
            raise TypeError(f"metric {key!r} is not a scalar (shape {tuple(value.shape)})")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")


class MetricsLogger:
    """Appends per-step metric rows to ``run_dir/metrics.jsonl`` (+ TensorBoard / W&B).

    resume_step: None starts a fresh log (an existing metrics.jsonl / samples.jsonl is
        emptied, so two runs never interleave in one file); an int keeps the rows with
        step <= resume_step and appends after them, dropping rows a crashed run wrote past
        its last checkpoint.
    tensorboard / wandb: also mirror scalars there; the packages are imported only when
        asked for, and a missing one is a ConfigError naming the extra to install.
    config: a plain dict stored as the W&B run config.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        resume_step: int | None = None,
        wandb_project: str = "posttrain",
        config: dict | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        for p in (self.metrics_path, self.samples_path):
            if resume_step is None:
                if p.exists():
                    p.unlink()
            else:
                _truncate_after(p, resume_step)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self._fd = os.open(self.metrics_path, flags, 0o644)
        self._samples_fd = os.open(self.samples_path, flags, 0o644)
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(wandb_project, config, resume_step) if wandb else None

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "run.tensorboard=true needs the tensorboard package: pip install 'posttrain[track]'"
            ) from None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _open_wandb(self, project: str, config: dict | None, resume_step: int | None):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "run.wandb=true needs the wandb package: pip install 'posttrain[track]'"
            ) from None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if (resume_step is not None and id_file.is_file()) else None
        run = wandb.init(
            project=project,
            dir=str(self.run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            name=self.run_dir.name,
        )
        id_file.write_text(run.id)
        return run

    @staticmethod
    def _write(fd: int, text: str) -> None:
        data = text.encode()
        # One write() of a whole line on an O_APPEND fd: the row lands entirely or not at all.
        written = os.write(fd, data)
        while written < len(data):  # only on exotic filesystems; finish the line
            written += os.write(fd, data[written:])
        os.fsync(fd)

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Append ``{"step": step, **metrics}`` as one line; returns the row written.

        metrics: namespaced key -> number (python, numpy or 1-element tensor).
        """
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            if k == "step":
                continue
            row[k] = _scalar(k, v)
        self._write(self._fd, json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))
        return row

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Append sample rows (prompt, completion, reward, ...) with their step, in one write."""
        if not rows:
            return
        lines = "".join(json.dumps({"step": int(step), **r}, default=str) + "\n" for r in rows)
        self._write(self._samples_fd, lines)

    def close(self) -> None:
        """Close files and trackers; safe to call twice."""
        for attr in ("_fd", "_samples_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullLogger:
    """What ranks other than 0 log to under torch.distributed: nothing (rank 0 is the writer)."""

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        return {"step": int(step), **metrics}

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


# Postfix fields in display order: (label, predicate on metric key).
_POSTFIX = (
    ("reward", lambda k: k == "reward/mean"),
    ("acc", lambda k: k in ("eval/accuracy", "reward/accuracy", "train/accuracy")),
    # kl/coef and kl/tokens are bookkeeping, *_sum are un-normalised accumulators.
    ("kl", lambda k: k.startswith("kl/") and k not in ("kl/coef", "kl/tokens") and not k.endswith("_sum")),
    ("len", lambda k: k.endswith("length_mean") or k.endswith("/length")),
    ("loss", lambda k: k in ("loss", "loss/total", "train/loss") or k.endswith("/loss")),
    ("alerts", lambda k: k == "alert/count"),  # reward-hacking alerts of the step (train/common/alerts.py)
)


def format_postfix(metrics: dict[str, Any]) -> str:
    """Short bar postfix, e.g. ``reward=0.512 kl=0.0031 len=41.5 loss=0.123``.

    Picks the first key matching each of reward/mean, an accuracy, kl/*, *length_mean and a
    loss, in the order given; missing ones are left out.
    """
    parts = []
    for label, match in _POSTFIX:
        for k, v in metrics.items():
            if match(k):
                try:
                    x = float(v.item() if hasattr(v, "item") else v)
                except (TypeError, ValueError):
                    break
                parts.append(f"{label}={x:.4g}")
                break
    return " ".join(parts)


def progress(total: int, desc: str, *, initial: int = 0, disable: bool | None = None, file=None):
    """A tqdm bar over optimizer steps; `initial` > 0 when resuming.

    Set its postfix with ``bar.set_postfix_str(format_postfix(row))``.
    disable=None hides it when the output is not a terminal (logs stay readable in CI).
    file: stream to draw on (default stderr).
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, initial=initial, dynamic_ncols=True, disable=disable, leave=True, file=file
    )
