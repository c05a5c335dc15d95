"""Summaries and the Markdown report of `posttrain bench` results (no measuring here)."""

from __future__ import annotations

import statistics


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(traces: list[dict], skip: int) -> dict:
    """Pool a framework's rounds: medians over steps after the first `skip` of each round."""
    steps = [s for t in traces for s in t["step_s"][skip:]]
    tokens = [n for t in traces for n in t["completion_tokens"][skip:]]
    phases: dict[str, list[float]] = {}
    for t in traces:
        for name, xs in t["phases"].items():
            phases.setdefault(name, []).extend(xs[skip:])
    curves = [t["reward_mean"] for t in traces]
    n = min((len(c) for c in curves), default=0)
    curve = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    out = {
        "steps_timed": len(steps),
        "median_step_s": _median(steps),
        "completion_tokens_per_s": (sum(tokens) / sum(steps[: len(tokens)])) if tokens and steps else None,
        "phase_median_s": {k: _median(v) for k, v in sorted(phases.items())},
        "reward_curve": curve,
        "reward_mean_second_half": statistics.fmean(curve[n // 2 :]) if n else None,
    }
    if traces and traces[0]["evals"]:  # accuracy mode: the first round's curve
        out["evals"] = traces[0]["evals"]
        out["train_s_total"] = [sum(t["step_s"]) for t in traces]
    return out


def time_to_target(evals: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches `target` (None: never)."""
    for e in evals:
        if e["accuracy"] >= target:
            return e["train_s"]
    return None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def format_markdown(results: dict) -> str:
    """Markdown tables of a `run_bench` result (what docs/benchmarks.md quotes)."""
    info, mode = results["machine"], results["config"]["mode"]
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, load avg (1 min) at start {info['loadavg_1m']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}; "
        f"{results['config']['threads']} torch threads."
    ]
    for model, per in results["models"].items():
        fws, speedup = per["frameworks"], per.get("speedup", {})
        lines.append(f"\n**{model}** ({per.get('params', 0) / 1e6:.2f}M params)")
        x = lambda name, sp=speedup: "—" if sp.get(name) is None else f"{sp[name]:.2f}x"
        if mode == "rollout":
            rows = [[n, _fmt(r["tokens_per_s"], ".0f"), _fmt(r["median_call_s"])] for n, r in fws.items()]
            lines += _table(["engine", "tokens/s", "median s / call"], rows)
        elif mode == "step":
            header = ["framework", "median step (s)", "completion tok/s", "generate (s)",
                      "posttrain speed-up", "mean reward, 2nd half"]  # fmt: skip
            rows = [
                [n, _fmt(r["median_step_s"]), _fmt(r["completion_tokens_per_s"], ".0f"),
                 _fmt(r["phase_median_s"].get("generate_s")), x(n), _fmt(r["reward_mean_second_half"])]
                for n, r in fws.items()
            ]  # fmt: skip
            lines += _table(header, rows)
            for n, r in fws.items():
                lines.append(f"\nreward curve ({n}): [{', '.join(f'{v:.2f}' for v in r['reward_curve'])}]")
                ph = ", ".join(f"{k} {v:.3f}" for k, v in r["phase_median_s"].items() if v is not None)
                lines.append(f"\nphase medians ({n}): {ph}")
        else:
            lines.append(
                f"\nSFT start: held-out accuracy {per['sft_accuracy']:.3f}; target {per['target']:.3f}"
            )
            header = ["framework", "time to target (s, training only)", "GRPO steps run", "median step (s)",
                      "final accuracy", "posttrain speed-up"]  # fmt: skip
            rows = []
            for n, r in fws.items():
                last = (r.get("evals") or [{}])[-1]
                rows.append([n, _fmt(r.get("time_to_target_s"), ".1f"), str(last.get("step", "—")),
                             _fmt(r["median_step_s"]), _fmt(last.get("accuracy")), x(n)])  # fmt: skip
            lines += _table(header, rows)
            for n, r in fws.items():
                pts = ", ".join(
                    f"({e['step']}, {e['train_s']:.0f}s, {e['accuracy']:.2f})" for e in r.get("evals", [])
                )
                lines.append(f"\naccuracy curve ({n}; step, training s, accuracy): {pts}")
    return "\n".join(lines) + "\n"
