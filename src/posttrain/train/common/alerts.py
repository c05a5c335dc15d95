"""Reward-hacking alerts for the online RL loop: watch the metrics, warn, optionally stop.

The case-studies seed (I, "DPO in Practice", §7 "Diagnostics to Watch") lists what to
watch while optimising against a reward: "Reward hacking signs: sudden KL spikes, length
explosion, template mimicry", "Entropy / calibration: sampling diversity", and
"Generalization: eval on out-of-distribution prompts". `HackingMonitor` turns each into a
check on the per-step metrics row (plain floats; it runs in train/, after the step):

    kl_spike          the KL to the reference (kl/k3, else kl/loss, else kl/k1) exceeds
                      kl_spike_factor × its mean over the previous `window` steps, and
                      kl_floor (tiny KLs are noise); the history restarts after a
                      reference refresh (algo.ref_refresh_every), which resets the KL
    length_explosion  rollout/length_mean exceeds length_factor × its mean over the
                      previous `window` steps
    entropy_collapse  policy/entropy falls below entropy_fraction × its mean over the
                      first `window` steps of the run
    reward_vs_heldout a held-out evaluation (eval/accuracy) is at least heldout_drop below
                      the best earlier one while the mean training reward of the last
                      `window` steps is above its mean at that best evaluation
    template_mimicry  one response string was produced for at least mimicry_frac of the
                      step's prompts (needs >= 2 prompts; identical answers within one
                      prompt's group are normal, the same text for different prompts is not)

A check whose threshold is null is off; a check whose metric the run does not log (no
reference, no entropy pass, no held-out evaluation) never fires — `describe` says which.
Every fired alert is logged as a warning, counted in the metrics row (`alert/<kind>` = 1,
`alert/count`) and appended to run_dir/alerts.jsonl, which `posttrain report` shows.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.train.config.checks import setting

log = logging.getLogger(__name__)

ALERTS_FILE = "alerts.jsonl"
KL_KEYS = ("kl/k3", "kl/loss", "kl/k1")
KINDS = ("kl_spike", "length_explosion", "entropy_collapse", "reward_vs_heldout", "template_mimicry")


@dataclass
class AlertsSection:
    """Reward-hacking alerts (case studies I §7): thresholds, and whether an alert stops the run."""

    enabled: bool = setting(True, "Run the reward-hacking checks every step.")
    stop: bool = setting(
        False,
        "Stop the run after the first step that raises an alert (checkpoint and final model are written).",
    )
    window: int = setting(10, "Steps of history the relative checks compare against.")
    kl_spike_factor: float | None = setting(
        5.0, "KL spike: KL > factor × mean KL of the previous window; null = off."
    )
    kl_floor: float = setting(0.01, "KL spike: KLs below this never alert.")
    length_factor: float | None = setting(
        2.0, "Length explosion: mean length > factor × its mean over the previous window."
    )
    entropy_fraction: float | None = setting(
        0.2, "Entropy collapse: entropy < fraction × its mean over the first window steps."
    )
    heldout_drop: float | None = setting(
        0.05, "Reward up, held-out down: eval/accuracy this far below its best while reward rose."
    )
    mimicry_frac: float | None = setting(
        0.5, "Template mimicry: one response text for at least this share of the prompts."
    )


def check_alerts(section: AlertsSection) -> None:
    """ConfigError for thresholds that cannot mean anything."""
    if section.window < 1:
        raise ConfigError(f"alerts.window must be >= 1, got {section.window}")
    for name in ("kl_spike_factor", "length_factor"):
        value = getattr(section, name)
        if value is not None and value <= 1.0:
            raise ConfigError(f"alerts.{name} must be > 1 (a ratio to the recent mean) or null, got {value}")
    for name in ("entropy_fraction", "mimicry_frac"):
        value = getattr(section, name)
        if value is not None and not 0.0 < value <= 1.0:
            raise ConfigError(f"alerts.{name} must be in (0, 1] or null, got {value}")
    if section.heldout_drop is not None and section.heldout_drop <= 0:
        raise ConfigError(f"alerts.heldout_drop must be > 0 or null, got {section.heldout_drop}")


@dataclass
class Alert:
    """One fired check: what, at which step, the observed value and the threshold it crossed."""

    step: int
    kind: str
    value: float
    threshold: float
    message: str

    def row(self) -> dict[str, Any]:
        """The alert as a JSON-serialisable dict (one line of alerts.jsonl)."""
        return asdict(self)


def append_alerts(run_dir: Path, alerts: list[Alert]) -> None:
    """Append fired alerts to run_dir/alerts.jsonl (one JSON object per alert)."""
    if alerts:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / ALERTS_FILE, "a") as f:
            f.writelines(json.dumps(a.row()) + "\n" for a in alerts)


def read_alerts(run_dir: Path) -> list[dict[str, Any]]:
    """The alerts a run recorded (empty when it has no alerts.jsonl)."""
    path = Path(run_dir) / ALERTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def top_response_prompt_frac(texts: list[str], group_id: list[int]) -> float:
    """Share of the step's prompts whose samples include the batch's most widespread text.

    texts: B responses; group_id: B prompt labels. For each distinct text, count the
    distinct prompts that produced it; return the largest count / number of prompts.
    """
    prompts_of: dict[str, set[int]] = {}
    for text, gid in zip(texts, group_id):
        prompts_of.setdefault(text, set()).add(gid)
    n_prompts = len(set(group_id))
    return max(len(p) for p in prompts_of.values()) / n_prompts if n_prompts else 0.0


class HackingMonitor:
    """The five checks over a run's metrics rows; state is plain lists (checkpointed)."""

    def __init__(self, section: AlertsSection):
        check_alerts(section)
        self.s = section
        self.history: dict[str, list[float]] = {"kl": [], "length": [], "entropy_start": [], "reward": []}
        self.evals: list[tuple[float, float]] = []  # (eval accuracy, mean reward of the window then)

    # ----------------------------------------------------------------- checks

    def _relative(
        self, key: str, value: float, factor: float | None, floor: float, step: int, kind: str, what: str
    ):
        past = self.history[key][-self.s.window :]
        fired = None
        if factor is not None and len(past) >= self.s.window:
            limit = max(factor * _mean(past), floor)
            if value > limit:
                fired = Alert(step, kind, value, limit,
                              f"{what} {value:.4g} > {factor:g} x mean {_mean(past):.4g} of the last {len(past)} steps")  # fmt: skip
        self.history[key].append(value)
        return fired

    def observe(
        self, step: int, metrics: dict[str, float], texts: list[str], group_id: list[int]
    ) -> list[Alert]:
        """Run every check on one step's metrics (and its responses); returns the fired alerts.

        Adds "rollout/top_response_prompt_frac" to `metrics` (the mimicry measure).
        """
        s, alerts = self.s, []
        kl_key = next((k for k in KL_KEYS if k in metrics), None)
        if kl_key is not None:
            alert = self._relative(
                "kl", float(metrics[kl_key]), s.kl_spike_factor, s.kl_floor, step, "kl_spike", kl_key
            )
            alerts += [alert] if alert else []
        if metrics.get("kl/ref_refreshed"):
            self.history["kl"].clear()  # the next step's KL restarts from 0 against the new reference
        if "rollout/length_mean" in metrics:
            alert = self._relative("length", float(metrics["rollout/length_mean"]), s.length_factor, 0.0, step,
                                   "length_explosion", "mean response length")  # fmt: skip
            alerts += [alert] if alert else []
        if "policy/entropy" in metrics:
            alerts += self._entropy(step, float(metrics["policy/entropy"]))
        if "reward/mean" in metrics:
            self.history["reward"].append(float(metrics["reward/mean"]))
            del self.history["reward"][: -s.window]
        if "eval/accuracy" in metrics:
            alerts += self._heldout(step, float(metrics["eval/accuracy"]))
        frac = top_response_prompt_frac(texts, group_id)
        metrics["rollout/top_response_prompt_frac"] = frac
        if s.mimicry_frac is not None and len(set(group_id)) >= 2 and frac >= s.mimicry_frac:
            top = Counter(texts).most_common(1)[0][0]
            alerts.append(Alert(step, "template_mimicry", frac, s.mimicry_frac,
                                f"one response for {frac:.0%} of the prompts: {top[:60]!r}"))  # fmt: skip
        for alert in alerts:
            metrics[f"alert/{alert.kind}"] = 1.0
            log.warning("reward-hacking alert at step %d: %s: %s", step, alert.kind, alert.message)
        metrics["alert/count"] = float(len(alerts))
        return alerts

    def _entropy(self, step: int, entropy: float) -> list[Alert]:
        start = self.history["entropy_start"]
        if len(start) < self.s.window:
            start.append(entropy)
            return []
        if self.s.entropy_fraction is None:
            return []
        limit = self.s.entropy_fraction * _mean(start)
        if entropy >= limit:
            return []
        return [Alert(step, "entropy_collapse", entropy, limit,
                      f"policy entropy {entropy:.4g} < {self.s.entropy_fraction:g} x its starting mean {_mean(start):.4g}")]  # fmt: skip

    def _heldout(self, step: int, accuracy: float) -> list[Alert]:
        rewards = self.history["reward"]
        reward = _mean(rewards) if rewards else float("nan")
        out = []
        if self.evals and self.s.heldout_drop is not None:
            best_acc, reward_then = max(self.evals)
            if accuracy <= best_acc - self.s.heldout_drop and reward > reward_then:
                out.append(Alert(step, "reward_vs_heldout", accuracy, best_acc - self.s.heldout_drop,
                                 f"held-out accuracy {accuracy:.3g} fell from its best {best_acc:.3g} while the "
                                 f"mean training reward rose {reward_then:.3g} -> {reward:.3g}"))  # fmt: skip
        self.evals.append((accuracy, reward))
        return out

    # ----------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "evals": [list(e) for e in self.evals],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.evals = [tuple(e) for e in state["evals"]]


def describe(section: AlertsSection, *, has_reference: bool, logs_entropy: bool, evaluates: bool) -> str:
    """One line for the dry-run plan: which checks run, and which cannot for lack of a metric."""
    if not section.enabled:
        return "alerts: off"
    missing = {
        "kl_spike": not has_reference,
        "entropy_collapse": not logs_entropy,
        "reward_vs_heldout": not evaluates,
    }
    thresholds = {"kl_spike": section.kl_spike_factor, "length_explosion": section.length_factor,
                  "entropy_collapse": section.entropy_fraction, "reward_vs_heldout": section.heldout_drop,
                  "template_mimicry": section.mimicry_frac}  # fmt: skip
    on = [k for k in KINDS if thresholds[k] is not None and not missing.get(k)]
    idle = [k for k in KINDS if thresholds[k] is not None and missing.get(k)]
    line = f"alerts: {', '.join(on) or 'none'} (window {section.window}" + (
        ", stop on alert)" if section.stop else ")"
    )
    return line + (f"; inactive without their metric: {', '.join(idle)}" if idle else "")
