"""2-process gloo runs of the offline loop on CPU (train/offline/dp.py).

N processes must give what one process gives on the same global batch: the same metrics
rows and the same weights up to float summation order, a checkpoint that resumes at the
other world size, and a clean, bounded end when a rank dies.

Weights are compared by the global relative difference ‖Δw‖ / ‖w‖: per tensor, the k_proj
biases differ by ~1e-5 relative because their gradient is zero in exact arithmetic (softmax
ignores a shift shared by all keys), so AdamW normalises pure summation noise into updates.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = ["--data.n_train", "64", "--data.n_eval", "8", "--train.steps", "5", "--train.batch_size", "8",
        "--train.micro_batch_size", "2", "--run.save_every", "2"]  # fmt: skip
SFT = [*TINY, "--train.eval_every", "5", "--train.eval_generations", "4", "--train.max_new_tokens", "8"]
DPO = [*TINY, "--train.eval_every", "0", "--train.eval_at_start", "false"]
WEIGHT_RTOL = 1e-5
LOSS_RTOL = 1e-5


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", POSTTRAIN_DIST_TIMEOUT_S="30")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def posttrain(*args: str, nproc: int = 1, torchrun: bool = False, timeout: float = 120):
    """Run the CLI; torchrun=True goes through torch.distributed.run instead of --nproc."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "posttrain", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "posttrain", *args] + (["--nproc", str(nproc)] if nproc > 1 else [])
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def relative_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5


def assert_same_rows(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        keys = {k for k in r1 if not k.startswith(("time/", "perf/"))}
        assert keys == {k for k in r2 if not k.startswith(("time/", "perf/"))}
        for k in keys:
            if r1[k] is None or isinstance(r1[k], int):
                assert r1[k] == r2[k], k
            else:
                assert r2[k] == pytest.approx(r1[k], rel=LOSS_RTOL, abs=1e-6), (r1["step"], k)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sft")
    posttrain("sft", *SFT, "--run.output_dir", str(base / "one"))
    posttrain("sft", *SFT, "--run.output_dir", str(base / "two"), nproc=2)
    return base / "one", base / "two"


def assert_sharded_layout(checkpoint: Path, models: list[str], world: int = 2) -> None:
    """`checkpoint` was written by `world` ranks with torch.distributed.checkpoint: one shard
    file per rank, no Hugging Face copy of the sharded models, every rank's RNG states."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["sharded"]["world_size"] == world and meta["sharded"]["models"] == models
    files = sorted(p.name for p in (checkpoint / "dcp").iterdir())
    assert files == [".metadata"] + [f"__{r}_0.distcp" for r in range(world)]
    assert not any((checkpoint / m).exists() for m in models)
    assert (checkpoint / "rng.json").is_file() and (checkpoint / "rng-rank1.json").is_file()
    assert (checkpoint / "tokenizer" / "tokenizer_config.json").is_file()


def test_sft_two_processes_match_one(sft_runs):
    one, two = sft_runs
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two / "final")  # final/ is a plain HF directory
    assert_sharded_layout(two / "checkpoints" / "step-000004", ["policy"])
    # one process keeps its format: the model in Hugging Face form, no DCP files
    assert (one / "checkpoints" / "step-000004" / "policy" / "model.safetensors").is_file()
    assert not (one / "checkpoints" / "step-000004" / "dcp").exists()


def _from_step4(run: Path, dest: Path) -> Path:
    """A copy of `run` as if it had stopped right after its step-4 checkpoint."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-000005")
    shutil.rmtree(dest / "final")
    (dest / "checkpoints" / "latest").write_text("step-000004\n")
    return dest


@pytest.mark.parametrize("source, nproc", [("two", 1), ("two", 2), ("one", 2)])
def test_checkpoint_resumes_at_any_world_size(sft_runs, tmp_path, source, nproc):
    """A sharded (2-process) checkpoint resumes in 1 and 2 processes, a one-process one in 2:
    each continues to the uninterrupted run's weights and metrics."""
    one, two = sft_runs
    run = _from_step4(two if source == "two" else one, tmp_path / "resumed")
    posttrain("sft", *SFT, "--run.output_dir", str(run), "--resume", nproc=nproc)
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 4
    assert relative_gap(weights(one), weights(run)) < WEIGHT_RTOL
    assert_same_rows(rows(one), rows(run))


def test_dpo_two_processes_under_torchrun_match_one(tmp_path):
    cache = ["--ref.cache_dir", str(tmp_path / "ref")]
    posttrain("dpo", *DPO, *cache, "--run.output_dir", str(tmp_path / "one"))
    posttrain("dpo", *DPO, *cache, "--run.output_dir", str(tmp_path / "two"), nproc=2, torchrun=True)
    assert_same_rows(rows(tmp_path / "one"), rows(tmp_path / "two"))
    assert relative_gap(weights(tmp_path / "one"), weights(tmp_path / "two")) < WEIGHT_RTOL
    steps = [r["step"] for r in rows(tmp_path / "two")]
    assert steps == sorted(set(steps))  # one writer: no row twice


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--train.batch_size", "7"], "must be a multiple of the number of processes (2)"),
    ],
)
def test_refusals_end_with_one_line(tmp_path, extra, words):
    args = [*DPO, *extra, "--run.output_dir", str(tmp_path / "run"), "--ref.cache_dir", str(tmp_path / "ref")]
    proc = subprocess.run([sys.executable, "-m", "posttrain", "dpo", *args, "--nproc", "2"], env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any process started


@pytest.mark.slow
@pytest.mark.parametrize("command", ["rm", "prm"])
def test_reward_models_two_processes_match_one(tmp_path, command):
    args = [*TINY, "--train.eval_every", "5"]
    posttrain(command, *args, "--run.output_dir", str(tmp_path / "one"))
    posttrain(command, *args, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    assert_same_rows(rows(tmp_path / "one"), rows(tmp_path / "two"))
    assert relative_gap(weights(tmp_path / "one"), weights(tmp_path / "two")) < WEIGHT_RTOL


def test_other_commands_refuse_several_processes():
    proc = subprocess.run([sys.executable, "-m", "posttrain", "eval", "--nproc", "2"], env=_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "runs in one process" in proc.stderr


def _rank_pid(launcher: int, rank: int) -> int:
    kids = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, kids):
        if f"RANK={rank}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes():
            return pid
    raise AssertionError(f"no rank {rank} among {kids}")


LONG_DPO = [*DPO, "--train.steps", "500"]


def signal_rank_one(cmd: list[str], env: dict, run: Path, sig: int) -> tuple[int, str, float]:
    """Start the 2-process job `cmd`, send `sig` to rank 1 once `run` holds a checkpoint;
    (exit status, stderr, seconds from the signal to the end of the job)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        os.kill(_rank_pid(proc.pid, 1), sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


def _signal_rank_one(run: Path, cache: Path, sig: int, timeout_s: str) -> tuple[int, str, float]:
    """signal_rank_one on a long 2-process DPO run."""
    args = [*LONG_DPO, "--run.output_dir", str(run), "--ref.cache_dir", str(cache), "--nproc", "2"]
    env = dict(_env(), POSTTRAIN_DIST_TIMEOUT_S=timeout_s)
    return signal_rank_one([sys.executable, "-m", "posttrain", "dpo", *args], env, run, sig)


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")


@needs_proc
def test_killed_rank_ends_the_job_with_one_line_and_a_loadable_checkpoint(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "ref"
    status, err, seconds = _signal_rank_one(run, cache, signal.SIGKILL, "30")
    assert status != 0 and seconds < 60
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 was killed by SIGKILL during step"), err

    # The last checkpoint loads: a one-process resume continues from it.
    from posttrain.train.common.checkpoint import CheckpointManager

    step = CheckpointManager.step_of(CheckpointManager(run).latest())
    posttrain("dpo", *LONG_DPO, "--train.steps", str(step + 1), "--run.output_dir", str(run), "--resume",
              "--ref.cache_dir", str(cache))  # fmt: skip
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == step


@needs_proc
def test_hung_rank_is_bounded_by_the_collective_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP) without dying: the others' collectives time out
    (POSTTRAIN_DIST_TIMEOUT_S=10 here) and the job ends with one line."""
    status, err, seconds = _signal_rank_one(tmp_path / "run", tmp_path / "ref", signal.SIGSTOP, "10")
    assert status != 0 and seconds < 60
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: lost contact with another rank during"), (
        err
    )
