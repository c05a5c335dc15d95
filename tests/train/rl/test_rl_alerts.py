"""Reward-hacking alerts (case studies I §7): each check provoked — by hand-made metric rows
with the arithmetic in the test, and in the real RL loop (an lr jump for the KL spike and
entropy collapse, a hackable digit reward with near-greedy sampling for template mimicry)
— plus the quiet cases, stop-on-alert, resume state, config errors and the run report."""

from __future__ import annotations

import json

import pytest

from posttrain import cli
from posttrain.errors import ConfigError
from posttrain.train.common.alerts import AlertsSection, HackingMonitor, read_alerts, top_response_prompt_frac
from posttrain.train.common.report import write_report
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config

DISTINCT = (["a", "b", "c", "d"], [0, 1, 2, 3])  # four prompts, four different responses


def _feed(monitor: HackingMonitor, rows: list[dict], texts=DISTINCT) -> list[list[str]]:
    """Kinds fired at each step for the given metric rows."""
    return [[a.kind for a in monitor.observe(step, dict(row), *texts)] for step, row in enumerate(rows)]


def test_kl_spike_by_hand():
    # window 3, factor 5: mean of 0.02, 0.02, 0.02 is 0.02 -> limit max(5 x 0.02, floor 0.01) = 0.1
    mon = HackingMonitor(AlertsSection(window=3, kl_spike_factor=5.0))
    assert _feed(mon, [{"kl/k3": 0.02}] * 3 + [{"kl/k3": 0.2}]) == [[], [], [], ["kl_spike"]]
    quiet = HackingMonitor(AlertsSection(window=3, kl_spike_factor=5.0))
    assert _feed(quiet, [{"kl/k3": 0.02}] * 3 + [{"kl/k3": 0.09}]) == [[]] * 4
    # below the floor a 50x rise is noise: 0.005 < max(5 x 1e-4, 0.01)
    floor = HackingMonitor(AlertsSection(window=3, kl_spike_factor=5.0, kl_floor=0.01))
    assert _feed(floor, [{"kl/k3": 1e-4}] * 3 + [{"kl/k3": 0.005}]) == [[]] * 4
    # a reference refresh restarts the history: no comparison until the window refills
    refresh = HackingMonitor(AlertsSection(window=2, kl_spike_factor=5.0))
    rows = [{"kl/k3": 0.02}, {"kl/k3": 0.02, "kl/ref_refreshed": 1.0}, {"kl/k3": 0.0}, {"kl/k3": 0.05}]
    assert _feed(refresh, rows) == [[]] * 4


def test_length_explosion_by_hand():
    # mean of 10, 12, 11 = 11 -> limit 2 x 11 = 22
    mon = HackingMonitor(AlertsSection(window=3, length_factor=2.0))
    rows = [{"rollout/length_mean": x} for x in (10, 12, 11, 30)]
    assert _feed(mon, rows)[-1] == ["length_explosion"]
    quiet = HackingMonitor(AlertsSection(window=3, length_factor=2.0))
    assert _feed(quiet, [{"rollout/length_mean": x} for x in (10, 12, 11, 21)])[-1] == []


def test_entropy_collapse_by_hand():
    # start mean (4.0 + 4.2) / 2 = 4.1 -> limit 0.2 x 4.1 = 0.82
    mon = HackingMonitor(AlertsSection(window=2, entropy_fraction=0.2))
    rows = [{"policy/entropy": x} for x in (4.0, 4.2, 1.0, 0.83, 0.81)]
    assert _feed(mon, rows) == [[], [], [], [], ["entropy_collapse"]]


def test_reward_up_while_heldout_accuracy_falls_by_hand():
    # eval at step 1: accuracy 0.5, mean reward of the window (0.2, 0.3) = 0.25;
    # eval at step 3: accuracy 0.4 <= 0.5 - 0.05 while the reward mean (0.6, 0.8) = 0.7 > 0.25
    rows = [{"reward/mean": 0.2}, {"reward/mean": 0.3, "eval/accuracy": 0.5}, {"reward/mean": 0.6},
            {"reward/mean": 0.8, "eval/accuracy": 0.4}]  # fmt: skip
    mon = HackingMonitor(AlertsSection(window=2, heldout_drop=0.05))
    assert _feed(mon, rows) == [[], [], [], ["reward_vs_heldout"]]
    # the same fall with a falling reward is not hacking (both got worse)
    falling = [dict(r) for r in rows]
    falling[2]["reward/mean"], falling[3]["reward/mean"] = 0.1, 0.1
    assert _feed(HackingMonitor(AlertsSection(window=2, heldout_drop=0.05)), falling)[-1] == []
    # a fall smaller than heldout_drop: 0.47 > 0.45
    small = [dict(r) for r in rows]
    small[3]["eval/accuracy"] = 0.47
    assert _feed(HackingMonitor(AlertsSection(window=2, heldout_drop=0.05)), small)[-1] == []


def test_template_mimicry_by_hand():
    # 4 prompts x 2 samples; "X" is answered for prompts 0, 1 and 2 -> 3/4 = 0.75 >= 0.5
    texts = ["X", "X", "X", "p1", "X", "p2", "q3", "r3"]
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    assert top_response_prompt_frac(texts, groups) == 0.75
    mon = HackingMonitor(AlertsSection(mimicry_frac=0.5))
    row = {}
    assert [a.kind for a in mon.observe(0, row, texts, groups)] == ["template_mimicry"]
    assert row["rollout/top_response_prompt_frac"] == 0.75 and row["alert/template_mimicry"] == 1.0
    # one prompt's group agreeing with itself is not mimicry: 1/4
    same_group = ["X", "X", "a", "b", "c", "d", "e", "f"]
    assert top_response_prompt_frac(same_group, groups) == 0.25
    assert HackingMonitor(AlertsSection(mimicry_frac=0.5)).observe(0, {}, same_group, groups) == []
    # a single prompt cannot show mimicry
    assert HackingMonitor(AlertsSection(mimicry_frac=0.5)).observe(0, {}, ["X", "X"], [0, 0]) == []


def test_null_thresholds_turn_checks_off_and_bad_ones_are_errors():
    off = AlertsSection(window=1, kl_spike_factor=None, length_factor=None, mimicry_frac=None)
    rows = [{"kl/k3": 0.02, "rollout/length_mean": 5}, {"kl/k3": 9.0, "rollout/length_mean": 500}]
    assert _feed(HackingMonitor(off), rows, (["X", "X"], [0, 1])) == [[], []]
    for bad in (
        dict(window=0),
        dict(kl_spike_factor=1.0),
        dict(entropy_fraction=1.5),
        dict(heldout_drop=0.0),
    ):
        with pytest.raises(ConfigError, match="alerts."):
            HackingMonitor(AlertsSection(**bad))


def test_state_round_trip_continues_the_same_checks():
    a = HackingMonitor(AlertsSection(window=3))
    _feed(a, [{"kl/k3": 0.02, "policy/entropy": 4.0}] * 3)
    b = HackingMonitor(AlertsSection(window=3))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    row = {"kl/k3": 0.2, "policy/entropy": 0.5}
    assert _feed(a, [row]) == _feed(b, [row]) == [["kl_spike", "entropy_collapse"]]


def test_lr_jump_provokes_kl_spike_then_entropy_collapse_in_the_loop(tmp_path):
    """GRPO on the digit reward; from step 4 the lr is raised to 0.1 (the scheduler resets
    it after each step, so it is set before each): the KL jumps ~10x at once and the
    entropy falls below a fifth of its start a few steps later."""
    cfg = tiny_config(tmp_path, "grpo", "algo.kl_coef=0.05", "alerts.window=3", "rollout.max_new_tokens=16",
                      "optim.max_grad_norm=100", steps=12)  # fmt: skip
    trainer = RLTrainer(cfg)
    kinds = []
    for step in range(11):
        if step >= 4:
            for group in trainer.policy.optimizer.param_groups:
                group["lr"] = 0.1
        kinds.append([a.kind for a in trainer._alerts(step, trainer.step())])
    assert kinds[:5] == [[]] * 5
    first = {k: next(i for i, ks in enumerate(kinds) if k in ks) for k in ("kl_spike", "entropy_collapse")}
    assert first["kl_spike"] == 5 and first["entropy_collapse"] > 5, kinds
    logged = read_alerts(tmp_path)
    assert {a["kind"] for a in logged} == {"kl_spike", "entropy_collapse"}


def test_hacked_reward_provokes_template_mimicry_and_stops_the_run(tmp_path):
    """Near-greedy sampling lets GRPO hack the digit reward with one string ('33333333')
    for every prompt; alerts.stop ends the run there, with the alert in metrics.jsonl,
    alerts.jsonl, the summary and the report."""
    cfg = tiny_config(
        tmp_path, "grpo", "algo.kl_coef=0.05", "rollout.temperature=0.01", "alerts.stop=true", steps=6
    )
    summary = RLTrainer(cfg).train()
    assert summary["steps"] < 6
    (alert,) = summary["stopped_by_alert"]
    assert alert["kind"] == "template_mimicry" and alert["value"] >= 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["alert/template_mimicry"] == 1.0 and rows[-1]["alert/count"] >= 1
    assert read_alerts(tmp_path)[-1]["kind"] == "template_mimicry"
    report = write_report([tmp_path], tmp_path / "report").read_text()
    assert "Reward-hacking alerts" in report and "template_mimicry" in report
    # without stop the same run goes on to its last step
    go_on = tiny_config(tmp_path / "on", "grpo", "algo.kl_coef=0.05", "rollout.temperature=0.01", steps=3)
    assert RLTrainer(go_on).train()["steps"] == 3


def test_dry_run_lists_active_and_inactive_checks(capsys):
    assert cli.main(["rl", "--algo.kl_placement", "none", "--alerts.stop", "true", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "alerts: length_explosion, entropy_collapse, template_mimicry (window 10, stop on alert)" in out
    assert "inactive without their metric: kl_spike, reward_vs_heldout" in out
