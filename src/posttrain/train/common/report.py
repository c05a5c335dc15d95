"""Markdown + HTML summary of one or more runs: final/best metrics, wall time, config
excerpt, eval results and links to the plots from `plots.plot_run`."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from posttrain.train.common.alerts import read_alerts
from posttrain.train.common.plots import PANELS, _labels, load_run, panel_keys, plot_run, series

CONFIG_EXCERPT_LINES = 60  # longer configs are cut; the full file sits in the run dir


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def wall_time_s(run_dir: Path, rows: list[dict]) -> float | None:
    """Training wall time: the sum of per-step ``time/step_s`` when logged, else the span
    between config.yaml (written at start) and the last metrics write, else None."""
    _, step_times = series(rows, "time/step_s")
    if step_times:
        return sum(step_times)
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if config.is_file() and metrics.is_file():
        span = metrics.stat().st_mtime - config.stat().st_mtime
        return span if span >= 0 else None
    return None


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Per-run facts for the report: steps, wall time, final and best of every panel key."""
    run_dir = Path(run_dir)
    rows = load_run(run_dir)
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    metrics: dict[str, dict[str, float | None]] = {}
    for panel in PANELS:
        for key in panel_keys(panel, {"run": rows}):
            _, values = series(rows, key)
            if not values:
                continue
            best = None
            if panel.higher_is_better is True:
                best = max(values)
            elif panel.higher_is_better is False:
                best = min(values)
            metrics[key] = {"first": values[0], "final": values[-1], "best": best}
    extra = {}
    for name in ("summary.json", "eval.json"):
        p = run_dir / name
        if p.is_file():
            try:
                extra[name] = json.loads(p.read_text())
            except json.JSONDecodeError:
                extra[name] = None  # a torn file is reported as unreadable, not fatal
    config = run_dir / "config.yaml"
    config_lines = config.read_text().splitlines() if config.is_file() else []
    return {
        "run_dir": str(run_dir),
        "rows": len(rows),
        "last_step": max(steps) if steps else None,
        "wall_time_s": wall_time_s(run_dir, rows),
        "metrics": metrics,
        "extra": extra,
        "config_lines": config_lines,
        "alerts": read_alerts(run_dir),
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif not isinstance(d, list):
        out[prefix.rstrip(".")] = d
    return out


def _blocks(
    run_dirs: list[Path], summaries: list[dict], labels: list[str], pngs: list[Path], out: Path
) -> list[tuple]:
    """The report as format-neutral blocks: ("h", level, text) | ("table", header, rows) |
    ("img", path, alt) | ("pre", text) | ("p", text)."""
    blocks: list[tuple] = [("h", 1, "posttrain report")]
    overview = [
        [
            label,
            _fmt(s["last_step"]),
            _fmt(s["rows"]),
            _fmt(s["wall_time_s"] and round(s["wall_time_s"], 1)),
            s["run_dir"],
        ]
        for label, s in zip(labels, summaries)
    ]
    blocks.append(("table", ["run", "last step", "rows", "wall time (s)", "directory"], overview))
    if pngs:
        blocks.append(("h", 2, "Plots"))
        for p in pngs:
            blocks.append(("img", os.path.relpath(p, out), p.stem))
    blocks.append(("h", 2, "Metrics (first / final / best)"))
    keys = list(dict.fromkeys(k for s in summaries for k in s["metrics"]))
    rows = []
    for key in keys:
        row = [key]
        for s in summaries:
            m = s["metrics"].get(key)
            row.append("–" if m is None else f"{_fmt(m['first'])} / {_fmt(m['final'])} / {_fmt(m['best'])}")
        rows.append(row)
    if rows:
        blocks.append(("table", ["metric", *labels], rows))
    else:
        blocks.append(("p", "No reward, accuracy, KL, length or loss metrics were logged."))
    for label, s in zip(labels, summaries):
        blocks.append(("h", 2, f"Run: {label}"))
        if s["alerts"]:  # train/common/alerts.py: reward-hacking checks that fired
            blocks.append(("h", 3, f"Reward-hacking alerts ({len(s['alerts'])})"))
            alert_rows = [
                [a["step"], a["kind"], _fmt(a["value"]), _fmt(a["threshold"]), a["message"]]
                for a in s["alerts"]
            ]
            blocks.append(("table", ["step", "alert", "value", "threshold", "what"], alert_rows[:50]))
        for name, data in s["extra"].items():
            flat = _flat(data) if data is not None else {"(unreadable)": None}
            scalars = [[k, _fmt(v)] for k, v in flat.items() if not isinstance(v, str) or len(v) < 120]
            if scalars:
                blocks.append(("h", 3, name))
                blocks.append(("table", ["key", "value"], scalars[:80]))
        if s["config_lines"]:
            lines = s["config_lines"]
            excerpt = lines[:CONFIG_EXCERPT_LINES]
            if len(lines) > CONFIG_EXCERPT_LINES:
                excerpt.append(f"# ... {len(lines) - CONFIG_EXCERPT_LINES} more lines in config.yaml")
            blocks.append(("h", 3, "config.yaml"))
            blocks.append(("pre", "\n".join(excerpt)))
    return blocks


def _markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "table":
            header, rows = b[1], b[2]
            esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(esc(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "pre":
            out.append("```yaml\n" + b[1] + "\n```")
        else:
            out.append(b[1])
        out.append("")
    return "\n".join(out)


def _html(blocks: list[tuple]) -> str:
    e = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(
                f'<figure><img src="{e(b[1])}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>'
            )
        elif kind == "pre":
            body.append(f"<pre>{e(b[1])}</pre>")
        else:
            body.append(f"<p>{e(b[1])}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
    )
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>posttrain report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(run_dirs: list[str | os.PathLike] | str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Plots plus ``report.md`` and ``report.html`` in `out_dir`; returns the Markdown path.

    A missing run directory (or one without metrics.jsonl) is a one-line ConfigError
    raised before anything is written.
    """
    from posttrain.train.common.checkpoint import atomic_write_text  # torch-heavy; after validation

    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    paths = [Path(p) for p in run_dirs]
    summaries = [summarize_run(p) for p in paths]  # validates every dir first
    out = Path(out_dir)
    pngs = plot_run(paths, out)
    blocks = _blocks(paths, summaries, _labels(paths), pngs, out)
    md = out / "report.md"
    atomic_write_text(md, _markdown(blocks))
    atomic_write_text(out / "report.html", _html(blocks))
    return md
