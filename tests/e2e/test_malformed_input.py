"""Malformed input answered by one line `error: ...` naming the key, file or row (issue #22):
output directories that cannot be used, unknown devices and presets, duplicated YAML keys,
datasets smaller than a batch, sequences past the model's context, impossible sampling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_args import SFT_ROWS as ROWS
from tiny_args import SFT_TINY as SFT

import posttrain.engines.models as models
from posttrain import cli

RL = ["--steps", "1", "--rollout.prompts_per_step", "2", "--rollout.group_size", "2",
      "--rollout.max_new_tokens", "4", "--data.n_train", "8", "--data.n_test", "0"]  # fmt: skip


def error_line(args: list[str], capsys) -> str:
    assert cli.main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "it/s]" not in ln and "%|" not in ln]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model is built (the error must come first)."""

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input was validated")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "build_value_model", refuse)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "command, key", [("sft", "run.output_dir"), ("rl", "run.output_dir"), ("eval", "output_dir")]
)
def test_output_dir_that_is_a_file(tmp_path, capsys, no_model, command, key):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    line = error_line([command, f"--{key}", str(f)], capsys)
    assert key in line and "is not a directory" in line and f.read_text() == "not a directory"
    line = error_line([command, f"--{key}", str(f / "sub")], capsys)
    assert key in line and "cannot create" in line


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap for a read-only mount")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(
        ["bwrap", "--bind", "/", "/", "--ro-bind", str(ro), str(ro), "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"bwrap cannot mount here: {probe.stderr.decode()[:200]}")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        ["bwrap", "--bind", "/", "/", "--dev", "/dev", "--ro-bind", str(ro), str(ro),
         sys.executable, "-m", "posttrain", "sft", "--run.output_dir", str(ro / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.output_dir" in lines[0] and "Read-only" in lines[0], proc.stderr


@pytest.mark.parametrize("device", ["graphics", "cuda:99", "tpu"])
def test_unknown_or_missing_device(capsys, no_model, device):
    line = error_line(["sft", "--model.device", device, "--dry-run"], capsys)
    assert "model.device" in line and repr(device) in line


def test_unknown_preset_is_not_a_hub_lookup(capsys, no_model):
    line = error_line(["sft", "--model.preset", "nope", "--dry-run"], capsys)
    assert "model.preset: unknown preset 'nope'" in line and "tiny" in line
    assert "did you mean 'small'" in error_line(["rl", "--model.preset", "smal", "--dry-run"], capsys)
    line = error_line(
        ["rl", "--algo.method", "ppo", "--algo.critic", "true", "--critic.preset", "huge"], capsys
    )
    assert "critic.preset: unknown preset 'huge'" in line


def test_yaml_with_a_duplicated_key(tmp_path, capsys, no_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.001\n  warmup_steps: 2\n  lr: 0.1\n")
    line = error_line(["sft", "--config", str(recipe), "--dry-run"], capsys)
    assert str(recipe) in line and "line 4" in line and "duplicate key 'lr' (first on line 2)" in line
    recipe.write_text("optim:\n  lr: 0.001\nrun:\n  seed: 1\noptim:\n  lr: 0.1\n")
    assert "duplicate key 'optim'" in error_line(["sft", "--config", str(recipe), "--dry-run"], capsys)


def test_dataset_smaller_than_a_batch(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "one.jsonl", ROWS[:1])
    line = error_line(["sft", "--data.path", "one.jsonl", *SFT, "--train.batch_size", "8"], capsys)
    assert "one.jsonl" in line and "1 usable row(s)" in line and "train.batch_size=8" in line
    _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+1?", "answer": "2"}])
    line = error_line(["rl", "--data.path", "prompts.jsonl", "--rollout.prompts_per_step", "8"], capsys)
    assert "prompts.jsonl" in line and "rollout.prompts_per_step=8" in line


def test_prompt_past_the_models_context(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    long_prompt = "What is " + "1+" * 700 + "1?"  # ~1410 characters; the tiny preset's window is 1024
    _jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "answer": "701"}] * 4)
    line = error_line(["rl", "--data.path", "long.jsonl", *RL[:-4], "--data.max_prompt_tokens", "4096",
                       "--run.output_dir", str(tmp_path / "rl")], capsys)  # fmt: skip
    assert "context window of 1024" in line and "data.max_prompt_tokens" in line
    _jsonl(tmp_path / "long_sft.jsonl", [{"prompt": long_prompt, "completion": "701"}] * 4)
    line = error_line(["sft", "--data.path", "long_sft.jsonl", *SFT, "--data.max_prompt_tokens", "4096",
                       "--run.output_dir", str(tmp_path / "sft")], capsys)  # fmt: skip
    assert "training row 1" in line and "context window of 1024" in line
    assert (
        not (tmp_path / "rl" / "metrics.jsonl").exists() and not (tmp_path / "sft" / "metrics.jsonl").exists()
    )


@pytest.mark.parametrize(
    "command, key, value, named",
    [("rl", "rollout.max_new_tokens", "0", None), ("rl", "rollout.max_new_tokens", "-3", None),
     ("rl", "rollout.temperature", "0", None), ("rl", "rollout.temperature", "-1", None),
     ("rl", "rollout.temperature", "nan", None), ("rl", "rollout.top_p", "0", None),
     ("rl", "eval.temperature", "-1", None), ("rl", "reward_exec.timeout_s", "0", None),
     ("rl", "reward_exec.max_error_rate", "2", None),
     ("rl", "rewards", "[{name: format, weight: 1e39}]", "rewards[0].weight"),
     ("eval", "sampling.max_new_tokens", "0", None), ("eval", "sampling.temperature", "-1", None),
     ("sft", "train.max_new_tokens", "0", None), ("rl", "critic.lr", "1e39", None),
     ("rl", "algo.kl_coef", "nan", None), ("dpo", "algo.beta", "nan", None),
     ("sft", "model.lora_r", "-1", None), ("sft", "run.seed", "-1", None), ("rl", "run.log_every", "-5", None),
     ("demo", "preset", "huge", None), ("sft", "model.attn_implementation", "bogus", None),
     ("dpo", "algo.beta", "-1", None), ("rm", "algo.head_init_std", "-1", None),
     ("sft", "data.no_think_fraction", "2", None), ("rl", "rollout.stop_strings", "['']", None),
     ("eval", "sampling.top_p", "0", None), ("eval", "sampling.batch_size", "0", None),
     ("rl", "eval.n", "-1", None), ("rl", "rewards", "[{name: format, start_step: -3}]", "rewards[0].start_step")],
)  # fmt: skip
def test_impossible_sampling_and_reward_settings_name_their_key_before_any_model(
    tmp_path, capsys, no_model, command, key, value, named
):
    out = "--output_dir" if command == "eval" else "--run.output_dir"
    line = error_line([command, f"--{key}", value, out, str(tmp_path)], capsys)
    assert (named or key) in line
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == [".posttrain.lock"]


def test_a_reward_column_no_row_has(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i}+1?"} for i in range(8)])
    line = error_line(["rl", "--data.path", "prompts.jsonl", "--data.task", "null", *RL[:-4],
                       "--rewards", "[{name: accuracy}]", "--run.output_dir", str(tmp_path / "rl")], capsys)  # fmt: skip
    assert "rewards[0] ('accuracy') reads the column 'answer'" in line and "prompts.jsonl" in line
    assert not (tmp_path / "rl").exists()
