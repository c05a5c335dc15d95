"""PNG plots of the key training metrics of one or more runs, overlaid.

Uses matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
switch), so plotting works on headless machines and inside other programs' processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.train.common.metrics import METRICS_FILE, read_jsonl


@dataclass(frozen=True)
class Panel:
    """One figure: a title, a file name and which metric keys belong on it."""

    name: str
    title: str
    match: Callable[[str], bool]
    higher_is_better: bool | None


PANELS: tuple[Panel, ...] = (
    Panel("reward", "Reward", lambda k: k.startswith("reward/"), True),
    Panel(
        "accuracy",
        "Accuracy and format rate",
        lambda k: (
            any(t in k for t in ("accuracy", "pass@", "maj@", "best_of", "format_rate"))
            and not k.startswith("reward/")
        ),
        True,
    ),
    Panel(
        "kl",
        "KL",
        lambda k: k.startswith("kl/") and k not in ("kl/coef", "kl/tokens") and not k.endswith("_sum"),
        False,
    ),
    Panel("length", "Response length (tokens)", lambda k: "length" in k and "/" in k, None),
    Panel(
        "loss",
        "Loss",
        lambda k: k == "loss" or k.startswith("loss/") or k.endswith("/loss") or k.endswith("_loss"),
        False,
    ),
)
MAX_KEYS_PER_PANEL = 6  # more lines than this on one axis stop being readable


def load_run(run_dir: str | os.PathLike) -> list[dict]:
    """Metric rows of a run directory (ConfigError if it or its metrics.jsonl is missing)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"no {METRICS_FILE} in run directory {run_dir}")
    return read_jsonl(path)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, skipping rows without it and null (non-finite) values."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(r.get("step"), int):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def panel_keys(panel: Panel, runs: dict[str, list[dict]]) -> list[str]:
    """Keys of `panel` present in any run, most common first, capped at MAX_KEYS_PER_PANEL.

    For the reward panel, ``reward/mean`` leads when present (the headline curve).
    """
    counts: dict[str, int] = {}
    for rows in runs.values():
        for r in rows:
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)) and panel.match(k):
                    counts[k] = counts.get(k, 0) + 1
    keys = sorted(counts, key=lambda k: (-counts[k], k))
    if "reward/mean" in keys:
        keys.remove("reward/mean")
        keys.insert(0, "reward/mean")
    return keys[:MAX_KEYS_PER_PANEL]


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in run_dirs]  # same basename in different places: use full paths


def plot_run(run_dirs: list[str | os.PathLike] | str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write one PNG per panel with data (reward, accuracy, KL, length, loss) to `out_dir`.

    run_dirs: one or several run directories with a metrics.jsonl; several are overlaid,
        each line labelled ``run: key`` (just ``key`` for a single run).
    Returns the PNG paths written (panels without any data are skipped).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    paths = [Path(p) for p in run_dirs]
    runs = dict(zip(_labels(paths), (load_run(p) for p in paths)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        keys = panel_keys(panel, runs)
        if not keys:
            continue
        fig = Figure(figsize=(7, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for label, rows in runs.items():
            for key in keys:
                steps, values = series(rows, key)
                if not steps:
                    continue
                name = key if len(runs) == 1 else f"{label}: {key}"
                # Markers make single-point series (e.g. before/after eval) visible.
                ax.plot(steps, values, label=name, marker="o" if len(steps) <= 20 else None, markersize=3)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"{panel.name}.png"
        fig.savefig(path)
        written.append(path)
    return written
