"""Summaries and the Markdown report of `posttrain bench` results (no measuring here)."""

from __future__ import annotations

import itertools
import math
import random
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
        # The learning rate each step used, first round: shows the schedules match.
        "lr_curve": traces[0].get("lr", []) if traces else [],
    }
    if traces and traces[0]["evals"]:  # accuracy mode: the first round's curve
        out["evals"] = traces[0]["evals"]
        out["train_s_total"] = [sum(t["step_s"]) for t in traces]
    return out


def reached(accuracy: float, target: float) -> bool:
    """accuracy >= target, up to float rounding: a target of start + gain (0.33 + 0.10 =
    0.43000000000000005) must count an accuracy of 86/200 = 0.43 as reached."""
    return accuracy >= target - 1e-9


def first_crossing(evals: list[dict], target: float) -> dict | None:
    """The first evaluation ({"step", "train_s", "accuracy"}) whose accuracy reaches `target`."""
    for e in evals:
        if reached(e["accuracy"], target):
            return e
    return None


def time_to_target(evals: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches `target` (None: never)."""
    hit = first_crossing(evals, target)
    return None if hit is None else hit["train_s"]


def _ratio(other: dict, ours: dict) -> dict:
    """Other framework's time-to-target over posttrain's, honest about runs that missed.

    Both reached: {"value": t_other / t_ours, "bound": "="}. Only posttrain reached: the
    other's whole training time is a lower bound on its time-to-target, so the ratio is
    at least total_other / t_ours ("bound": ">"). Only the other reached: posttrain's whole
    training time bounds its own from below, so the ratio is below t_other / total_ours
    ("bound": "<"). Neither: no ratio ({"value": None, "bound": None}).
    """
    t_o, t_p = other["time_to_target_s"], ours["time_to_target_s"]
    if t_o is not None and t_p is not None:
        return {"value": t_o / t_p, "bound": "="}
    if t_p is not None:
        return {"value": other["train_s"] / t_p, "bound": ">"}
    if t_o is not None:
        return {"value": t_o / ours["train_s"], "bound": "<"}
    return {"value": None, "bound": None}


def seed_rows(traces: dict[str, list[dict]], target: float) -> list[dict]:
    """Time-to-accuracy per GRPO seed (first round of each seed), with the ratio to posttrain.

    traces: framework -> its run traces (each with "seed", "evals", "step_s"). Returns one
    {"seed", "frameworks": {fw: {"time_to_target_s", "steps_to_target", "steps_run",
    "final_accuracy", "median_step_s", "train_s"}}, "ratio": {fw: _ratio(...)}} per seed,
    in the order the seeds ran; a target not reached has time and steps None.
    """
    rows: dict[int, dict] = {}
    for fw, ts in traces.items():
        for t in ts:
            row = rows.setdefault(t["seed"], {"seed": t["seed"], "frameworks": {}})
            if fw in row["frameworks"]:
                continue  # a later repeat of the same seed
            hit = first_crossing(t["evals"], target)
            last = t["evals"][-1] if t["evals"] else {}
            row["frameworks"][fw] = {
                "time_to_target_s": None if hit is None else hit["train_s"],
                "steps_to_target": None if hit is None else hit["step"],
                "steps_run": len(t["step_s"]),
                "final_accuracy": last.get("accuracy"),
                "median_step_s": _median(t["step_s"]),
                "train_s": sum(t["step_s"]),
                # Mean sampled training reward over the run: many more samples than the
                # held-out evaluation, so a less noisy (if in-distribution) learning signal.
                "mean_reward": statistics.fmean(t["reward_mean"]) if t.get("reward_mean") else None,
            }
    for row in rows.values():
        ours = row["frameworks"].get("posttrain")
        row["ratio"] = {
            fw: _ratio(r, ours)
            for fw, r in row["frameworks"].items()
            if ours is not None and fw != "posttrain"
        }
    return list(rows.values())


# Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom.

    Tabled for df <= 30; above, the Cornish-Fisher expansion around the normal quantile z,
    z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2), which is within 1e-4 there.
    """
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def sign_flip_p(diffs: list[float], draws: int = 20000, exact_up_to: int = 16) -> tuple[float, bool]:
    """Two-sided p-value of the paired sign-flip (permutation) test of mean(diffs) = 0.

    Under the null each paired difference is as likely +d as -d, so the p-value is the
    share of the 2^n sign patterns whose |sum| reaches the observed |sum|. Exact for
    n <= `exact_up_to`; above, `draws` random patterns from a fixed seed (the observed
    pattern counted once, so p > 0). Returns (p, exact).
    """
    n = len(diffs)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one paired difference")
    observed = abs(sum(diffs)) - 1e-12 * (1 + sum(abs(d) for d in diffs))  # float ties count
    if n <= exact_up_to:
        hits = sum(
            abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed
            for signs in itertools.product((1, -1), repeat=n)
        )
        return hits / 2**n, True
    rng = random.Random(0)
    hits = 1 + sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed for _ in range(draws))
    return hits / (draws + 1), False


def paired_summary(seeds: list[dict], metric: str) -> dict[str, dict]:
    """posttrain against each other framework on `metric`, paired by GRPO seed.

    seeds: `seed_rows` output. For every framework f != posttrain with at least one seed
    where both have the metric: n, both means, the mean of d = posttrain - f, its sample
    std and standard error, the 95% t interval (n >= 2), wins / losses / ties, and the
    sign-flip test's p-value. A seed pairs the same start, prompt pool and sampling seed,
    so the pairing removes the seed-to-seed spread that both frameworks share.
    """
    out: dict[str, dict] = {}
    others = sorted({fw for row in seeds for fw in row["frameworks"] if fw != "posttrain"})
    for fw in others:
        pairs = [
            (row["frameworks"]["posttrain"][metric], row["frameworks"][fw][metric])
            for row in seeds
            if "posttrain" in row["frameworks"] and fw in row["frameworks"]
            and row["frameworks"]["posttrain"].get(metric) is not None
            and row["frameworks"][fw].get(metric) is not None
        ]  # fmt: skip
        if not pairs:
            continue
        d = [a - b for a, b in pairs]
        n = len(d)
        mean = statistics.fmean(d)
        sd = statistics.stdev(d) if n >= 2 else None
        se = sd / math.sqrt(n) if sd is not None else None
        half = t_quantile_975(n - 1) * se if se is not None else None
        p, exact = sign_flip_p(d)
        out[fw] = {
            "metric": metric,
            "n": n,
            "mean_posttrain": statistics.fmean(a for a, _ in pairs),
            "mean_other": statistics.fmean(b for _, b in pairs),
            "mean_diff": mean,
            "sd_diff": sd,
            "se_diff": se,
            "ci95": None if half is None else [mean - half, mean + half],
            "wins": sum(x > 0 for x in d),
            "losses": sum(x < 0 for x in d),
            "ties": sum(x == 0 for x in d),
            "p_sign_flip": p,
            "p_exact": exact,
        }
    return out


# The metrics compared seed by seed, with their report labels.
PAIRED_METRICS = {"final_accuracy": "accuracy at the last eval", "mean_reward": "mean training reward"}


def paired_summaries(seeds: list[dict]) -> dict[str, dict[str, dict]]:
    """`paired_summary` for every metric of PAIRED_METRICS: {metric: {framework: summary}}."""
    return {metric: paired_summary(seeds, metric) for metric in PAIRED_METRICS}


def _paired_table(paired: dict[str, dict[str, dict]]) -> list[str]:
    """Rows of `paired_summaries` output with 2+ seeds (nothing when there are none)."""
    rows = []
    for metric, per_fw in paired.items():
        for fw, s in per_fw.items():
            if s["n"] < 2:
                continue
            ci = s["ci95"]
            rows.append([PAIRED_METRICS[metric], fw, str(s["n"]), _fmt(s["mean_posttrain"]), _fmt(s["mean_other"]),
                         f"{s['mean_diff']:+.3f}", f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
                         f"{s['wins']}/{s['losses']}/{s['ties']}",
                         f"{s['p_sign_flip']:.3f}" + ("" if s["p_exact"] else " (sampled)")])  # fmt: skip
    if not rows:
        return []
    header = ["metric", "vs", "seeds", "posttrain mean", "other mean", "mean difference (posttrain - other)",
              "95% t interval", "posttrain ahead / behind / tied", "sign-flip p"]  # fmt: skip
    intro = "\nPaired over seeds (each seed: both frameworks from the same start and prompt pool, with the same seed):"
    return [intro, *_table(header, rows)]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _seed_table(seeds: list[dict], target: float) -> list[str]:
    """One row per (seed, framework): time and steps to target ("not reached"), final accuracy."""
    header = ["seed", "framework", "time to target (s, training only)", "steps to target", "steps run",
              "accuracy at the last eval", "mean training reward", "median s/step",
              "time-to-target ratio vs posttrain"]  # fmt: skip
    rows = []
    for row in seeds:
        for fw, r in row["frameworks"].items():
            reached = r["time_to_target_s"] is not None
            ratio = row["ratio"].get(fw, {"value": None, "bound": None})
            rtext = (
                "—"
                if ratio["value"] is None
                else {"=": "", ">": "> ", "<": "< "}[ratio["bound"]] + (f"{ratio['value']:.2f}x")
            )
            rows.append([str(row["seed"]), fw,
                         _fmt(r["time_to_target_s"], ".1f") if reached else f"not reached ({r['train_s']:.0f} s run)",
                         str(r["steps_to_target"]) if reached else "—", str(r["steps_run"]),
                         _fmt(r["final_accuracy"]), _fmt(r.get("mean_reward")), _fmt(r["median_step_s"]),
                         rtext])  # fmt: skip
    return _table(header, rows) + [f"\n(target {target:.3f}; ratio > 1: posttrain reached it sooner)"]


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
            lines += _seed_table(per["seeds"], per["target"])
            lines += _paired_table(paired_summaries(per["seeds"]))
            for n, r in fws.items():
                pts = ", ".join(
                    f"({e['step']}, {e['train_s']:.0f}s, {e['accuracy']:.2f})" for e in r.get("evals", [])
                )
                lines.append(f"\naccuracy curve ({n}, first seed; step, training s, accuracy): {pts}")
    return "\n".join(lines) + "\n"


def format_combined(combined: dict) -> str:
    """Markdown of `combine_results`: the per-seed table and the paired comparison."""
    lines = [f"Pooled from: {', '.join(combined['sources'])}"]
    for name, per in combined["models"].items():
        starts = ", ".join(f"{a:.3f}" for a in per["sft_accuracy"])
        lines.append(f"\n**{name}**: SFT start held-out accuracy {starts}; target {per['target']:.3f}")
        lines += _seed_table(per["seeds"], per["target"]) + _paired_table(per["paired"])
    return "\n".join(lines) + "\n"
