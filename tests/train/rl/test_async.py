"""Asynchronous RL with bounded staleness (rollout.max_staleness, train/rl/async_rollouts.py).

Properties over the trained batches (the version of every token), determinism, exact
resume (a crash mid-run and a kill -9 of a subprocess, then resume), the audit of
samples.jsonl (each prompt trained exactly the expected number of times), the settings'
validation, and the CLI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.config.rl import validate
from posttrain.train.rl.async_rollouts import behaviour_metrics, staleness_metrics
from posttrain.train.rl.controller import RLTrainer
from rl_common import cli_resume_matches_uninterrupted, tiny_config

TESTS = Path(__file__).parents[2]  # tests/, where rl_common.py lives
N_TRAIN, P, G = 8, 4, 4  # 8 prompts, 4 per step: an epoch every 2 steps
# A "module:function" reward: what a subprocess (the CLI) can import by name.
REWARD = "rewards=[{name: 'rl_common:digit_fraction', weight: 1.0}]"


def _cfg(run: Path, *extra: str, steps: int = 4):
    return tiny_config(run, "grpo", f"data.n_train={N_TRAIN}", *extra, steps=steps)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trained(run: Path) -> list[dict]:
    return [r for r in _rows(run / "samples.jsonl") if "trained" in r]


def _weights(trainer: RLTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}


def _audit(run: Path, steps: int) -> Counter:
    """prompt id -> times trained (samples / G), from the trained rows of samples.jsonl."""
    rows = _trained(run)
    assert [r["step"] for r in rows] == list(range(steps))
    counts = Counter(t["prompt_id"] for r in rows for t in r["trained"])
    return Counter({pid: n / G for pid, n in counts.items()})


def _train_recording(trainer: RLTrainer) -> list[tuple]:
    """Train; return (step, versions [B, T], response mask [B, T], metrics) of every step."""
    seen = []
    step = trainer.step

    def recording_step():
        metrics = step()
        b = trainer._last_batch
        seen.append((trainer.step_count - 1, b.versions.clone(), b.seq.response_mask.clone(), metrics))
        return metrics

    trainer.step = recording_step
    trainer.train()
    return seen


def _crash_in_step_three(trainer: RLTrainer) -> None:
    """Train until step 3 starts, then raise (a crash after the checkpoint of step 2)."""
    step = trainer.step

    def crash_in_step_three():
        if trainer.step_count == 2:
            raise KeyboardInterrupt("simulated crash in step 3")
        return step()

    trainer.step = crash_in_step_three
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def _crash_resume_matches(ref: RLTrainer, tmp_path: Path, extra: tuple[str, ...], steps: int) -> None:
    """A run crashed in step 3 (after the checkpoint of step 2) and resumed trains exactly what
    the uninterrupted `ref` (output dir tmp_path / "ref") trained: the same weights and trained
    rows, and with 4 steps x 4 prompts over 8 prompts (two epochs) each prompt exactly twice."""
    _crash_in_step_three(RLTrainer(_cfg(tmp_path / "run", *extra, steps=steps)))
    assert CheckpointManager.step_of(CheckpointManager(tmp_path / "run").latest()) == 2
    resumed = RLTrainer(_cfg(tmp_path / "run", *extra, steps=steps))
    assert resumed.train()["resumed_from"] == 1
    a, b = _weights(ref), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _trained(tmp_path / "ref") == _trained(tmp_path / "run")
    counts = _audit(tmp_path / "run", steps)
    assert len(counts) == N_TRAIN and set(counts.values()) == {2.0}


# ------------------------------------------------------------------ the bound


@pytest.mark.parametrize("k", [1, 2])
def test_every_token_is_exactly_min_step_k_versions_old(k, tmp_path):
    steps = 4
    trainer = RLTrainer(_cfg(tmp_path, f"rollout.max_staleness={k}", steps=steps))
    seen = _train_recording(trainer)
    assert [s for s, *_ in seen] == list(range(steps))
    for s, versions, mask, metrics in seen:
        on = mask > 0
        staleness = s - versions[on]
        assert staleness.max() <= k and staleness.min() >= 0
        assert torch.all(staleness == min(s, k))  # whole generations: exactly version max(0, s - k)
        assert metrics["async/staleness_max"] == metrics["async/staleness_mean"] == min(s, k)
        assert metrics["async/partial_frac"] == 0.0
        assert metrics["async/stale_token_frac"] == (1.0 if s > 0 else 0.0)
    for row in _trained(tmp_path):
        for t in row["trained"]:
            assert t["versions"] == [max(0, row["step"] - k)] * 2


def test_staleness_and_behaviour_metrics_by_hand():
    versions = torch.tensor([[3, 3, 2], [1, 2, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    m = staleness_metrics(3, versions, mask)
    # staleness per counted token: 0, 0, 1, 2, 1 -> mean 4/5, max 2; row 1 mixes versions 1 and 2
    assert m["async/staleness_mean"] == pytest.approx(0.8)
    assert m["async/staleness_max"] == 2.0
    assert m["async/partial_frac"] == 1.0  # row 0: versions {3, 2}; row 1: {1, 2}
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    sampling = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 0.9]]))
    b = behaviour_metrics(3, versions, mask, old, sampling)
    # k3 of KL(μ ‖ π_old) per token: r = π_old/μ, (r - 1) - log r; fresh tokens (0, 0), (0, 1):
    # r = 1 -> 0 and r = 2 -> 1 - log 2; mean (1 - log 2) / 2. Stale tokens all have r = 1.
    assert b["async/behave_kl_fresh"] == pytest.approx((1 - torch.log(torch.tensor(2.0)).item()) / 2)
    assert b["async/behave_kl_stale"] == pytest.approx(0.0)
    assert b["async/fresh_token_frac"] == pytest.approx(2 / 5)


# ------------------------------------------------------------------ determinism


def test_two_async_runs_train_identical_weights(tmp_path):
    got = []
    for name in ("a", "b"):
        trainer = RLTrainer(_cfg(tmp_path / name, "rollout.max_staleness=1", steps=3))
        trainer.train()
        got.append(_weights(trainer))
    for key in got[0]:
        assert torch.equal(got[0][key], got[1][key]), key


def test_step_without_train_is_asynchronous_too(tmp_path):
    """The Python API's step() starts the rollout thread itself: same batches as train()."""
    by_train = RLTrainer(_cfg(tmp_path / "train", "rollout.max_staleness=1", steps=3))
    by_train.train()
    by_step = RLTrainer(_cfg(tmp_path / "step", "rollout.max_staleness=1", steps=3))
    rows = [by_step.step() for _ in range(3)]
    by_step.stop_rollouts()
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    a, b = _weights(by_train), _weights(by_step)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_async_differs_from_sync_after_the_first_update(tmp_path):
    """The async run trains on samples of the previous version: not the synchronous run."""
    sync = RLTrainer(_cfg(tmp_path / "sync", steps=2))
    sync.train()
    asyn = RLTrainer(_cfg(tmp_path / "async", "rollout.max_staleness=1", steps=2))
    asyn.train()
    a, b = _weights(sync), _weights(asyn)
    assert any(not torch.equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------ resume and the audit


@pytest.mark.parametrize("k", [1, 2])
def test_crash_then_resume_equals_uninterrupted(k, tmp_path):
    steps, extra = 4, (f"rollout.max_staleness={k}", "run.save_every=1", "run.resume=true")
    ref = RLTrainer(_cfg(tmp_path / "ref", *extra, steps=steps))
    ref.train()

    _crash_resume_matches(ref, tmp_path, extra, steps)


def test_extending_a_finished_run_needs_the_old_version_it_kept(tmp_path):
    """A run of 2 steps resumed to 4: step 2 samples with version 1, which the final
    checkpoint (learner at version 2) must have stored."""
    extra = ("rollout.max_staleness=1", "run.resume=true")  # the default LR schedule is constant
    ref = RLTrainer(_cfg(tmp_path / "ref", *extra, steps=4))
    ref.train()
    RLTrainer(_cfg(tmp_path / "run", *extra, steps=2)).train()
    resumed = RLTrainer(_cfg(tmp_path / "run", *extra, steps=4))
    resumed.train()
    a, b = _weights(ref), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _trained(tmp_path / "ref") == _trained(tmp_path / "run")


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from rl_common import cli_resume_matches_uninterrupted, tiny_config
from posttrain.train.rl.controller import RLTrainer
cfg = tiny_config(Path({run!r}), "grpo", "data.n_train={n}", "rollout.max_staleness=2", "run.save_every=1",
                  "run.resume=true", {reward!r}, steps=5)
RLTrainer(cfg).train()
"""


def _sigkill_once_logged(proc: subprocess.Popen, metrics: Path, n_rows: int) -> None:
    """SIGKILL `proc` as soon as `metrics` holds n_rows rows."""
    give_up = time.time() + 240
    while len(_rows(metrics)) < n_rows:
        if proc.poll() is not None or time.time() > give_up:
            pytest.fail(f"the run ended or hung before {n_rows} metrics rows (exit code {proc.poll()})")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_mid_async_step_then_cli_resume_is_exact(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", POSTTRAIN_TEST_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])

    def launch(run: Path) -> subprocess.Popen:
        code = KILL_SCRIPT.format(tests=str(TESTS), run=str(run), n=N_TRAIN, reward=REWARD)
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # fmt: skip

    ref = launch(tmp_path / "ref")
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err.decode()[-2000:]

    run = tmp_path / "run"
    # Killed while step 3 or step 4 (of 5) runs, varying between runs.
    _sigkill_once_logged(launch(run), run / "metrics.jsonl", 2 + int(time.time()) % 2)
    # Resume with the CLI, from the config the run wrote.
    cli_resume_matches_uninterrupted(tmp_path / "ref", run, env)


# ------------------------------------------------------------------ evaluation, errors, settings


def test_evaluation_during_an_async_run_uses_the_current_policy(tmp_path):
    """eval.every pauses the rollout thread and samples from the learner's current weights;
    the training batches stay exactly those of a run without evaluation."""
    ev = ("data.n_test=4", "eval.n=4", "eval.every=1")
    with_eval = RLTrainer(_cfg(tmp_path / "eval", "rollout.max_staleness=1", *ev, steps=3))
    with_eval.train()
    without = RLTrainer(_cfg(tmp_path / "plain", "rollout.max_staleness=1", "data.n_test=4", steps=3))
    without.train()
    a, b = _weights(with_eval), _weights(without)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all("eval/accuracy" in r for r in _rows(tmp_path / "eval" / "metrics.jsonl") if r["step"] < 3)


def test_an_error_in_the_rollout_thread_reaches_the_trainer_as_itself(tmp_path):
    """A reward that always raises: the asynchronous run stops with the same error, type and
    message, as the synchronous one."""
    from posttrain.errors import RewardError

    rewards = "rewards=[{name: 'rl_common:failing_reward', weight: 1.0}]"
    with pytest.raises(RewardError) as sync:
        RLTrainer(_cfg(tmp_path / "sync", rewards)).train()
    with pytest.raises(RewardError) as asyn:
        RLTrainer(_cfg(tmp_path / "async", rewards, "rollout.max_staleness=1")).train()
    assert str(asyn.value) == str(sync.value) and "this reward always fails" in str(sync.value)


def test_a_stalled_collect_stops_the_run_naming_the_phase(tmp_path):
    """A reward that sleeps from step 2 on (under a longer reward deadline): the learner's
    wait for that batch ends after rollout.async_timeout_s with one line."""
    rewards = (
        "rewards=[{name: 'rl_common:digit_fraction'}, {name: 'rl_common:stalled_reward', start_step: 1}]"
    )
    cfg = _cfg(
        tmp_path, "rollout.max_staleness=1", rewards, "reward_exec.timeout_s=4", "rollout.async_timeout_s=1"
    )
    with pytest.raises(TrainingError) as e:
        RLTrainer(cfg).train()
    assert re.fullmatch(
        r"async rollouts: the rollout thread stalled: waited 1 s for the batch of step 2 while it was "
        r"collecting step 2 \(version 0\) \(rollout\.async_timeout_s=1\)",
        str(e.value),
    ), str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("rollout.max_staleness=-1",), "rollout.max_staleness must be >= 0"),
        (("rollout.partial_tokens=4",), "needs rollout.max_staleness >= 1"),
        (("rollout.max_staleness=1", "rollout.async_timeout_s=0"), "rollout.async_timeout_s"),
        (("rollout.max_staleness=1", "algo.method=ppo", "algo.trust_region=0.01"), "trust_region"),
        (
            ("rollout.max_staleness=1", "rollout.partial_tokens=4", "rollout.thinking_budget=4"),
            "thinking_budget",
        ),
        (
            ("rollout.max_staleness=1", "rollout.partial_tokens=4", "env.name=tools", "backend=ray"),
            "not supported with env.name on backend: ray",
        ),
    ],
)
def test_settings_are_validated(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(tmp_path, *extra))


def test_resuming_a_synchronous_checkpoint_asynchronously_is_refused(tmp_path):
    RLTrainer(_cfg(tmp_path, "run.save_every=1", steps=1)).train()
    with pytest.raises(ConfigError, match="written by a synchronous run"):
        RLTrainer(_cfg(tmp_path, "run.resume=true", "rollout.max_staleness=1", steps=2)).train()


def test_data_parallel_refuses_async(tmp_path):
    from posttrain.train.rl.dp import check_world

    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        check_world(_cfg(tmp_path, "rollout.max_staleness=1"), 2)


def test_plan_describes_the_schedule(tmp_path):
    from posttrain.train.rl.setup import plan

    assert "asynchronous, max_staleness 2" in plan(_cfg(tmp_path, "rollout.max_staleness=2"))
    assert "rollouts: synchronous" in plan(_cfg(tmp_path))


def test_cli_runs_async(tmp_path):
    from posttrain.train.config.loader import save_config

    cfg_path = save_config(_cfg(tmp_path / "run", REWARD, steps=2), tmp_path / "rl.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", POSTTRAIN_TEST_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "rl", "--config", str(cfg_path), "--rollout.max_staleness", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _trained(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(t["versions"] == [0, 0] for r in rows for t in r["trained"])  # steps 0 and 1 both sample v0


# ------------------------------------------------------------------ partial rollouts


def test_partial_rollouts_follow_the_segment_schedule(tmp_path):
    """Token t of a step-s sample is in segment t // n, sampled with version max(0, min(s - k + j, s))."""
    k, n, steps = 2, 3, 4
    trainer = RLTrainer(
        _cfg(tmp_path, f"rollout.max_staleness={k}", f"rollout.partial_tokens={n}", steps=steps)
    )
    seen = _train_recording(trainer)
    mixed = 0.0
    for s, versions, mask, metrics in seen:
        segment = torch.arange(versions.shape[1]) // n  # [T]
        expected = (s - k + segment).clamp(min=0, max=s).expand_as(versions)
        on = mask > 0
        assert torch.equal(versions[on], expected[on])
        assert 0 <= metrics["async/staleness_max"] <= k
        mixed += metrics["async/partial_frac"]
    assert mixed > 0  # samples longer than one segment continued under a newer version


def test_partial_rollouts_crash_then_resume_equals_uninterrupted(tmp_path):
    """A checkpoint may cut a collect between segments: it is redone from its recorded
    prompt position with the stored older weights."""
    extra = ("rollout.max_staleness=2", "rollout.partial_tokens=3", "run.save_every=1", "run.resume=true")
    ref = RLTrainer(_cfg(tmp_path / "ref", *extra))
    ref.train()
    _crash_in_step_three(RLTrainer(_cfg(tmp_path / "run", *extra)))
    resumed = RLTrainer(_cfg(tmp_path / "run", *extra))
    resumed.train()
    a, b = _weights(ref), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _trained(tmp_path / "ref") == _trained(tmp_path / "run")


# ------------------------------------------------------------------ partial multi-turn rollouts


class _AnswerEveryTurn:
    """A multi-turn environment a random model keeps talking to: every model turn is answered
    with an observation (the turn limit ends the trajectory)."""

    observation_role = "tool"
    tool_schemas = staticmethod(list)

    def reset(self, row):
        self.answers = (f"noted {k}" for k in range(1, 1000))

    def step(self, turn):
        from posttrain.data.envs import EnvStep

        return EnvStep(next(self.answers), tool_call=True)


def _multi_turn(env: str) -> tuple[str, ...]:
    """Overrides of a tiny multi-turn run: the tools env (a random model mostly answers in its
    first turn), or an env that answers every turn of turns cut short by digit stop strings."""
    if env == "tools":
        return ("env.name=tools", "env.max_turns=2", "env.max_total_tokens=40", "rollout.max_new_tokens=12",
                "rewards=[{name: task}]")  # fmt: skip
    from posttrain.data.envs import ENVIRONMENTS

    if "test_answer_every_turn" not in ENVIRONMENTS:
        ENVIRONMENTS.register("test_answer_every_turn")(_AnswerEveryTurn)
    return ("env.name=test_answer_every_turn", "env.max_turns=3", "env.max_total_tokens=40",
            "rollout.max_new_tokens=8", f"rollout.stop_strings={list('0123456789')}")  # fmt: skip


@pytest.mark.parametrize("env", ["tools", "answer_every_turn"])
def test_partial_multi_turn_rollouts_keep_the_bound_and_resume_exactly(env, tmp_path, monkeypatch):
    """Multi-turn trajectories generated in segments (engines/rollout/multiturn.py): every
    token's version is one of step s's segment versions, versions never decrease along a
    trajectory (observations carry the version before them), and a checkpoint that cuts a
    collect between two segments (of one turn or between turns) resumes bit-identically,
    with each prompt trained exactly the expected number of times."""
    k, n, steps = 2, 3, 4
    extra = (*_multi_turn(env), f"rollout.max_staleness={k}", f"rollout.partial_tokens={n}",
             "run.save_every=1", "run.resume=true")  # fmt: skip
    ref = RLTrainer(_cfg(tmp_path / "ref", *extra, steps=steps))
    seen = _train_recording(ref)
    mixed, turns = 0.0, []
    for s, versions, mask, metrics in seen:
        on = mask > 0
        allowed = {max(0, min(s - k + j, s)) for j in range(versions.shape[1] + 1)}
        assert set(versions[on].unique().tolist()) <= allowed
        assert (versions.diff(dim=-1) >= 0).all()
        assert 0 <= metrics["async/staleness_max"] <= k
        mixed += metrics["async/partial_frac"]
        turns.append(metrics["tools/turns_mean"])
    assert mixed > 0  # some trajectories continued under a newer version
    if env == "answer_every_turn":
        assert max(turns) > 1.5  # trajectories of several turns: segments ran on across turns

    from posttrain.train.rl.async_rollouts import AsyncRollouts

    phases = []  # what the rollout thread was doing when each checkpoint paused it
    state_dict = AsyncRollouts.state_dict

    def recording_state_dict(self, current_version):
        phases.append(self._phase)
        return state_dict(self, current_version)

    monkeypatch.setattr(AsyncRollouts, "state_dict", recording_state_dict)
    _crash_resume_matches(ref, tmp_path, extra, steps)
    # a checkpoint paused a collect between two of its segments (the schedule makes the thread
    # wait there for a version not yet published), so the resume redid a cut collect
    assert any(re.search(r"segment [1-9]", phase) for phase in phases), phases
