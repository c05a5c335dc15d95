"""Never damage an existing run: the run-directory lock (real processes), no change before
validation, no silent restart on --resume, and checkpoints that survive a kill inside a
re-save (issue #22)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_args import SFT_ROWS
from tiny_args import SFT_TINY as TINY

from posttrain import cli
from posttrain.errors import ConfigError, TrainingError
from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.common.rundir import LOCK_FILE, begin_run, resume_point, run_lock


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _posttrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=300)  # fmt: skip


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if "it/s]" not in line and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def _holder(run_dir: Path) -> subprocess.Popen:
    """A process that holds run_dir's lock until killed (prints 'held' once it does)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from posttrain.train.common.rundir import run_lock
        with run_lock({str(run_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _finished_run(d: Path) -> dict[str, bytes]:
    """A run directory as a finished run leaves it (files with recognisable content)."""
    (d / "checkpoints" / "step-000002").mkdir(parents=True)
    (d / "checkpoints" / "step-000002" / "meta.json").write_text('{"step": 2}')
    (d / "checkpoints" / "latest").write_text("step-000002\n")
    (d / "config.yaml").write_text(f"run:\n  output_dir: {d}\n")
    (d / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.5}\n')
    (d / "samples.jsonl").write_text('{"step": 2, "completion": "old"}\n')
    (d / "summary.json").write_text('{"old": true}\n')
    return _snapshot(d)


def test_second_run_and_resume_are_refused_while_the_holder_lives_and_kill9_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = _finished_run(run_dir)
    holder = _holder(run_dir)
    try:
        (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
        for extra in ([], ["--resume"]):
            line = _one_error_line(
                _posttrain(
                    "sft",
                    "--data.path",
                    "sft.jsonl",
                    *TINY,
                    "--run.output_dir",
                    str(run_dir),
                    *extra,
                    cwd=tmp_path,
                )  # fmt: skip
            )
            assert f"pid {holder.pid}" in line and "in use" in line and str(run_dir) in line
        assert _snapshot(run_dir) == {**before, LOCK_FILE: f"{holder.pid}\n".encode()}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(run_dir):  # the kernel dropped the dead holder's lock
        assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with run_lock(run_dir):  # re-entrant inside one process
            pass


def test_lock_is_exclusive_between_processes_and_released_on_exit(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=f"in use by another posttrain run \\(pid {holder.pid}\\)"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.terminate()
        holder.wait()
    with run_lock(tmp_path):
        pass


def test_failing_commands_leave_a_finished_run_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = _finished_run(run_dir)
    rows = [dict(r) for r in SFT_ROWS]
    del rows[3]["completion"]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    failing = [
        ["sft", "--data.path", "bad.jsonl", *TINY],  # bad data
        ["sft", "--data.path", "good.jsonl", *TINY, "--model.preset", "nope"],  # a late (model) error
        ["rl", "--rollout.max_new_tokens", "0"],
        ["sft", "--data.path", "good.jsonl", *TINY, "--resume"],  # a damaged checkpoint
        ["sft", "--data.path", "good.jsonl", *TINY, "--optim.lr", "1e39"],
        ["rl", "--rollout.temperature", "0"],
        ["eval", "--data.n", "2", "--sampling.k", "1"],  # would write samples.jsonl + config.yaml
    ]
    for args in failing:
        key = "--output_dir" if args[0] == "eval" else "--run.output_dir"
        assert cli.main([*args, key, str(run_dir)]) == 2, args
        err = capsys.readouterr().err.splitlines()
        err = [ln for ln in err if "it/s]" not in ln and "%|" not in ln and not ln.startswith("warning: ")]
        assert len(err) == 1 and err[0].startswith("error: "), (args, err)
        after = _snapshot(run_dir)
        after.pop(LOCK_FILE, None)
        assert after == before, args


def test_resume_with_metrics_but_no_checkpoint_refuses(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep=1)
    assert resume_point(ckpt, resume=True) is None  # an empty directory: a fresh start
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert resume_point(ckpt, resume=False) is None
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        resume_point(ckpt, resume=True)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "checkpoints" / ".tmp-step-000004-1").mkdir(parents=True)  # a torn save only:
    assert resume_point(ckpt, resume=True) is None  # removed; nothing was lost
    (tmp_path / "checkpoints" / "latest").write_text("step-000004\n")  # pointer to a lost checkpoint
    with pytest.raises(TrainingError, match="refusing to restart"):
        resume_point(ckpt, resume=True)


def test_fresh_run_replaces_the_previous_runs_outputs_only_in_begin_run(tmp_path):
    from posttrain.train.offline.commands import SFTConfig

    _finished_run(tmp_path)
    cfg = SFTConfig()
    cfg.run.output_dir = str(tmp_path)
    begin_run(tmp_path, cfg, resumed=True)
    assert (tmp_path / "checkpoints" / "step-000002").is_dir() and (tmp_path / "summary.json").is_file()
    begin_run(tmp_path, cfg, resumed=False)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()
    assert "output_dir" in (tmp_path / "config.yaml").read_text()


_KILL_AT_RENAME = textwrap.dedent(
    """
    import os, sys, torch
    from posttrain.train.common import checkpoint
    from posttrain.train.common.checkpoint import CheckpointManager
    model = torch.nn.Linear(3, 2)
    ckpt = CheckpointManager(sys.argv[1], keep=1)
    ckpt.save(3, models={"m": model}, state={"step": 3, "v": "first"})
    real, calls = os.replace, []
    def replace(a, b):
        calls.append(str(a))
        if len(calls) == int(sys.argv[2]):
            os._exit(137)  # killed: no cleanup runs
        return real(a, b)
    checkpoint.os.replace = replace
    with torch.no_grad():
        model.weight.fill_(7.0)
    ckpt.save(3, models={"m": model}, state={"step": 3, "v": "second"})
    """
)


# os.replace calls of the re-save: 1 meta.json into the temp dir, 2 old copy aside, 3 new copy
# into place, 4 the `latest` pointer. A kill before call k:
@pytest.mark.parametrize("kill_at, version", [(2, "first"), (3, "second"), (4, "second")])
def test_kill_inside_the_final_resave_with_keep_1_leaves_a_recognised_checkpoint(tmp_path, kill_at, version):
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, str(tmp_path), str(kill_at)],
                          env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    ckpt = CheckpointManager(tmp_path, keep=1)
    latest = ckpt.latest()
    assert latest is not None and latest.name == "step-000003"
    model = torch.nn.Linear(3, 2)
    state = ckpt.load(latest, models={"m": model}, restore_rng=False)
    assert state == {"step": 3, "v": version}
    assert bool((model.weight == 7.0).all()) == (version == "second")
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["latest", "step-000003"]


def test_fresh_run_never_replaces_outputs_no_posttrain_run_wrote(tmp_path):
    from posttrain.train.offline.commands import SFTConfig

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "my_model.bin").write_text("the user's own work")
    cfg = SFTConfig()
    with pytest.raises(ConfigError, match="holds final that no posttrain run wrote"):
        begin_run(tmp_path, cfg, resumed=False)
    assert (tmp_path / "final" / "my_model.bin").read_text() == "the user's own work"
    assert not (tmp_path / "config.yaml").exists()


def test_a_command_that_fails_early_leaves_no_new_directory(tmp_path, capsys):
    target = tmp_path / "new" / "run"
    assert (
        cli.main(["sft", "--data.path", str(tmp_path / "missing.jsonl"), "--run.output_dir", str(target)])
        == 2
    )
    assert "missing.jsonl" in capsys.readouterr().err
    assert not target.exists()


def test_a_damaged_checkpoint_is_one_error_naming_it(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = CheckpointManager(tmp_path, keep=2)
    path = ckpt.save(1, models={"m": model}, state={"step": 1})
    weights = path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated on disk
    with pytest.raises(TrainingError, match=r"checkpoint .*step-000001 is damaged \(\w+"):
        ckpt.load(path, models={"m": torch.nn.Linear(3, 2)}, restore_rng=False)


def test_real_run_is_locked_then_resumes_after_kill9(tmp_path):
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    run_dir = tmp_path / "run"
    base = ["sft", "--data.path", "sft.jsonl", *TINY[:2], *TINY[4:], "--train.batch_size", "4",
            "--run.save_every", "2", "--run.output_dir", str(run_dir)]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "posttrain", *base, "--train.steps", "100000"], cwd=tmp_path,
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not checkpoint"
            time.sleep(0.2)
        line = _one_error_line(_posttrain(*base, "--train.steps", "100000", "--resume", cwd=tmp_path))
        assert f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = CheckpointManager.step_of(CheckpointManager(run_dir).latest())
    proc = _posttrain(*base, "--train.steps", str(step + 2), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == step
