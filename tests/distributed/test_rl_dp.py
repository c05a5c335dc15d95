"""2-process gloo runs of `posttrain rl` on CPU (train/rl/dp.py, train/rl/shards.py).

N processes must give what one process gives on the same global batch. The same batch
means the same rollouts: the one-process reference runs with `rollout.shards=2`, i.e. it
samples the step's prompts in the same two seeded shards the two ranks sample. Then the
final policy (and critic) weights agree within 1e-5 relative (‖Δw‖ / ‖w‖, float32) and the
metrics rows agree within float tolerance, except keys that differ by nature:

- time/* and rollout/tokens_per_s: wall-clock measurements;
- value/explained_variance: a ratio of variances per micro-batch, averaged over
  micro-batches, and 2 ranks make twice as many micro-batches of half the rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_offline_dp import _env, assert_sharded_layout, relative_gap

TESTS = str(Path(__file__).resolve().parents[1])
WEIGHT_RTOL = 1e-5
METRIC_RTOL = 1e-4  # float drift of a few steps of AdamW on summation-order noise
# Timings; the explained variance is a ratio per micro-batch (2 ranks make smaller ones); the
# weight-sync bytes are 0 in one process (the generator shares the policy module) and the
# state dict's size on N ranks (the generator samples from its own full copy).
# Keys that differ by nature between the runs compared (timings; what a weight sync moved,
# which depends on where the roles live; the Ray backend's own counters).
BY_NATURE = ("time/", "rollout/tokens_per_s", "value/explained_variance", "sync/", "ray/")
REWARD = '[{name: "rl_common:digit_fraction", weight: 1.0}]'
TINY = ["--model.preset", "tiny", "--run.seed", "0", "--data.task", "arithmetic", "--data.n_train", "64",
        "--data.n_test", "0", "--data.difficulty", "1", "--rollout.prompts_per_step", "4",
        "--rollout.group_size", "4", "--rollout.max_new_tokens", "8", "--optim.lr", "3e-3",
        "--optim.max_grad_norm", "1.0", "--sample_log_every", "0", "--steps", "5",
        "--run.save_every", "2", "--run.keep_checkpoints", "3"]  # fmt: skip
GRPO = [*TINY, "--algo.method", "grpo"]
PPO = [*TINY, "--algo.method", "ppo", "--algo.num_minibatches", "2", "--run.save_every", "0"]

# Dynamic sampling with refill rounds (3-4 rounds a step here, whose prompt counts do not
# divide by 2) and success-rate prompt selection, which must stay in lockstep across ranks.
DAPO = [*TINY, "--algo.method", "dapo", "--rollout.group_size", "2", "--rollout.max_new_tokens", "2",
        "--data.selection", "success_rate", "--steps", "3", "--run.save_every", "0"]  # fmt: skip


def rl(*args: str, nproc: int = 1, torchrun: bool = False, reward: str = REWARD, ok: bool = True,
       timeout: float = 180):  # fmt: skip
    """`posttrain rl` with the test rewards importable (rl_common); nproc 1 samples in 2
    shards; torchrun=True starts the ranks through torch.distributed.run instead of --nproc."""
    env = _env()
    env["PYTHONPATH"] = TESTS + os.pathsep + env["PYTHONPATH"]
    cmd = [sys.executable, "-m", "posttrain", "rl", *args, "--rewards", reward]
    if torchrun:
        cmd[1:3] = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "posttrain",
        ]
    elif nproc > 1:
        cmd += ["--nproc", str(nproc)]
    if nproc == 1:
        cmd += ["--rollout.shards", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, model: str = "final") -> dict:
    return load_file(str(run / model / "model.safetensors"))


def assert_same_rows(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        keys = {k for k in r1 if not k.startswith(BY_NATURE)}
        assert keys == {k for k in r2 if not k.startswith(BY_NATURE)}
        for k in keys:
            if r1[k] is None or isinstance(r1[k], int):
                assert r1[k] == r2[k], (r1["step"], k)
            else:
                assert r2[k] == pytest.approx(r1[k], rel=METRIC_RTOL, abs=1e-6), (r1["step"], k)


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo")
    rl(*GRPO, "--run.output_dir", str(base / "one"))
    rl(*GRPO, "--run.output_dir", str(base / "two"), nproc=2)
    return base / "one", base / "two"


def test_grpo_two_processes_match_one(grpo_runs):
    one, two = grpo_runs
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    steps = [r["step"] for r in rows(two)]
    assert steps == sorted(set(steps))  # one writer: no row twice
    assert_sharded_layout(two / "checkpoints" / "step-000004", ["policy"])
    from transformers import AutoModelForCausalLM

    # final/ is consolidated by rank 0 in Hugging Face format
    model = AutoModelForCausalLM.from_pretrained(two / "final")
    assert relative_gap(weights(two), {k: v for k, v in model.state_dict().items() if k in weights(two)}) == 0


def _from_step2(run: Path, dest: Path) -> Path:
    """A copy of `run` as if it had stopped right after its step-2 checkpoint."""
    shutil.copytree(run, dest)
    for later in (dest / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > 2:
            shutil.rmtree(later)
    shutil.rmtree(dest / "final")
    (dest / "checkpoints" / "latest").write_text("step-000002\n")
    lines = (dest / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] < 2))
    return dest


@pytest.mark.parametrize("source, nproc", [("two", 1), ("two", 2), ("one", 2)])
def test_checkpoint_resumes_at_any_world_size(grpo_runs, tmp_path, source, nproc):
    """A sharded (2-process) checkpoint resumes in 1 and 2 processes, a one-process one in 2,
    to the uninterrupted run's weights and metrics."""
    one, two = grpo_runs
    run = _from_step2(two if source == "two" else one, tmp_path / "resumed")
    # resuming in 2 processes goes through torchrun
    rl(*GRPO, "--run.output_dir", str(run), "--run.resume", "true", nproc=nproc, torchrun=nproc > 1)
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 1
    assert relative_gap(weights(one), weights(run)) < WEIGHT_RTOL
    assert_same_rows(rows(one), rows(run))


@pytest.mark.slow
def test_ppo_with_critic_two_processes_match_one(tmp_path):
    rl(*PPO, "--run.output_dir", str(tmp_path / "one"))
    rl(*PPO, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL
    assert relative_gap(weights(one, "final_critic"), weights(two, "final_critic")) < WEIGHT_RTOL


@pytest.mark.slow
def test_ppo_sharded_checkpoint_with_critic_and_refreshed_reference_resumes_in_one_process(tmp_path):
    """The critic and its optimizer are sharded like the policy, and so is the refreshed
    reference (without optimizer state): each rank writes its shards of it. Resuming the
    step-2 checkpoint in one process reaches the uninterrupted 2-process run's weights."""
    args = [
        *PPO,
        "--steps",
        "3",
        "--run.save_every",
        "2",
        "--algo.kl_coef",
        "0.05",
        "--algo.ref_refresh_every",
        "1",
    ]
    two = tmp_path / "two"
    rl(*args, "--run.output_dir", str(two), nproc=2)
    step2 = two / "checkpoints" / "step-000002"
    assert_sharded_layout(step2, ["critic", "policy", "reference"])  # the reference's shards too
    run = tmp_path / "resumed"
    shutil.copytree(two, run)
    shutil.rmtree(run / "checkpoints" / "step-000003")
    for final in ("final", "final_critic"):
        shutil.rmtree(run / final)
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    rl(*args, "--run.output_dir", str(run), "--run.resume", "true")
    for final in ("final", "final_critic"):
        assert relative_gap(weights(two, final), weights(run, final)) < WEIGHT_RTOL


# GRPO's preset has a KL loss to the reference (kl_coef 0.01): the runs above already score
# with an FSDP2-sharded reference on 2 ranks. Here it is refreshed from the policy every 2
# steps (into the shards), checkpointed (sharded) and resumed across world sizes.
REFRESH = [*GRPO, "--algo.kl_coef", "0.05", "--algo.ref_refresh_every", "2"]


@pytest.mark.slow
def test_refreshed_sharded_reference_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    rl(*REFRESH, "--run.output_dir", str(tmp_path / "one"))
    rl(*REFRESH, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sum(r["kl/ref_refreshed"] for r in rows(two)) == 2  # after steps 2 and 4
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL
    assert_sharded_layout(two / "checkpoints" / "step-000004", ["policy", "reference"])
    # 1 -> 2: a one-process checkpoint's reference (HF files) loads into the shards; 2 -> 1.
    for source, nproc in ((one, 2), (two, 1)):
        run = _from_step2(source, tmp_path / f"resumed-{nproc}")
        rl(*REFRESH, "--run.output_dir", str(run), "--run.resume", "true", nproc=nproc, torchrun=nproc > 1)
        assert relative_gap(weights(one), weights(run)) < WEIGHT_RTOL
        assert_same_rows(rows(one), rows(run))


@pytest.mark.slow
def test_kdrl_with_a_sharded_teacher_two_processes_match_one(tmp_path):
    from rl_common import train_digit_teacher

    teacher = train_digit_teacher(tmp_path / "teacher", steps=5)
    args = [*TINY, "--algo.method", "kdrl", "--teacher.path", str(teacher), "--run.save_every", "0"]
    rl(*args, "--run.output_dir", str(tmp_path / "one"))
    rl(*args, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL


@pytest.mark.slow
def test_dapo_refills_and_success_rate_selection_two_processes_match_one(tmp_path):
    rl(*DAPO, "--run.output_dir", str(tmp_path / "one"))
    rl(*DAPO, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert max(r["rollout/gen_rounds"] for r in rows(two)) > 1  # refills happened
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL


@pytest.mark.slow
def test_trpo_two_processes_match_one(tmp_path):
    """TRPO's natural-gradient step (train/rl/trpo.py) under 2 processes: each rank's share of
    g, of the Fisher-vector products and of the line search's values, summed over ranks,
    gives the one-process step on the same global batch (in micro-batches of 4 rows)."""
    trpo = [*TINY, "--algo.method", "trpo", "--algo.micro_batch_size", "4", "--run.save_every", "0"]
    rl(*trpo, "--run.output_dir", str(tmp_path / "one"))
    rl(*trpo, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sum(r["trpo/accepted"] for r in rows(two)) >= 1  # steps were taken, not all rejected
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL


def test_rank_that_raises_mid_step_ends_the_job_with_one_line(tmp_path):
    reward = '[{name: "rl_common:digit_fraction_failing_on_rank_one", weight: 1.0}]'
    proc = rl(*GRPO, "--run.output_dir", str(tmp_path / "run"), "--reward_exec.max_error_rate", "0",
              nproc=2, reward=reward, ok=False)  # fmt: skip
    assert proc.returncode != 0
    # The rank's own log (a warning from the reward runner) may come first; the job's
    # verdict is one line, last, naming the rank and the phase.
    errors = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr
    assert errors[0].startswith("error: rank 1 (step 2): rewards failed"), errors[0]
    assert "failed on purpose" in errors[0]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--rollout.prompts_per_step", "3"], "rollout.prompts_per_step=3 must be a multiple of the number"),
        (["--rollout.shards", "3"], "rollout.shards=3 must be 0 or a multiple"),
        (["--backend", "ray"], "backend: ray places the roles itself; run it without --nproc"),
    ],
)
def test_refusals_end_with_one_line_before_any_model(tmp_path, extra, words):
    proc = rl(*GRPO, *extra, "--run.output_dir", str(tmp_path / "run"), nproc=2, ok=False, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any process started


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_killed_rank_ends_the_rl_job_with_one_line_and_a_loadable_checkpoint(tmp_path):
    """SIGKILL rank 1 of a long 2-process GRPO run once a checkpoint exists: the job ends
    within 60 s with one line naming the rank, and the last checkpoint resumes in one process."""
    from test_offline_dp import signal_rank_one

    from posttrain.train.common.checkpoint import CheckpointManager

    run = tmp_path / "run"
    env = dict(_env(), POSTTRAIN_DIST_TIMEOUT_S="30")
    env["PYTHONPATH"] = TESTS + os.pathsep + env["PYTHONPATH"]
    args = [
        *GRPO,
        "--steps",
        "500",
        "--run.save_every",
        "1",
        "--run.output_dir",
        str(run),
        "--rewards",
        REWARD,
    ]
    cmd = [sys.executable, "-m", "posttrain", "rl", *args, "--nproc", "2"]
    status, err, seconds = signal_rank_one(cmd, env, run, signal.SIGKILL)
    assert status != 0 and seconds < 60
    lines = err.strip().splitlines()
    # The kill lands mid-step (the phase may carry what the step was doing) or while rank 1
    # writes its shards of the next checkpoint (one every step here): either way the job's
    # verdict is the only line, naming the rank and the phase. (A surviving rank's C++ runtime
    # may print "terminate called without an active exception" when the collective it was in
    # breaks; the launcher drops that line.)
    pattern = r"error: rank 1 was killed by SIGKILL during (step|checkpoint at step) \d+( \([^)]*\))?; the job was stopped"
    assert len(lines) == 1 and re.match(pattern, lines[0]), err

    step = CheckpointManager.step_of(CheckpointManager(run).latest())
    rl(
        *GRPO,
        "--steps",
        str(step + 1),
        "--run.save_every",
        "0",
        "--run.output_dir",
        str(run),
        "--run.resume",
        "true",
    )
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == step - 1
