"""The `posttrain` CLI as a user runs it: help, one-line errors with exit code 2, config
saving, dry runs, resume flag, report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from test_commands import run_cli

from posttrain import cli


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_lists_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("sft", "rm", "prm", "dpo", "rl", "eval", "demo", "bench", "report"):
        assert f"  {name} " in proc.stdout
    assert run_cli().returncode == 2  # no command: usage, failure status


def test_unknown_subcommand():
    assert_one_line_error(run_cli("rll"), "unknown command 'rll'", "did you mean 'rl'?")


def test_bad_key_missing_config_and_missing_run_dir(tmp_path):
    assert_one_line_error(
        run_cli("eval", "--sampling.kk", "3"), "unknown config key 'sampling.kk' — did you mean 'sampling.k'?"
    )
    assert_one_line_error(run_cli("eval", "--config", str(tmp_path / "nope.yaml")), "config file not found")
    assert_one_line_error(run_cli("report", str(tmp_path / "no_run")), "run directory not found")
    assert_one_line_error(run_cli("eval", "--resume"), "posttrain eval has no --resume")


def test_command_help_and_dry_run(tmp_path):
    proc = run_cli("eval", "--help")
    assert proc.returncode == 0
    assert "--sampling.k  int  (default: 4)" in proc.stdout
    assert "Samples per prompt" in proc.stdout
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"sampling:\n  k: 8\noutput_dir: {tmp_path / 'out'}\n")
    proc = run_cli("eval", "--config", str(recipe), "--sampling.temperature=0.5", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = yaml.safe_load(proc.stdout)
    assert plan["sampling"]["k"] == 8 and plan["sampling"]["temperature"] == 0.5
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


# --------------------------------------------------------------------------- in-process


TOY_MODULE = textwrap.dedent(
    '''
    from dataclasses import dataclass, field
    from posttrain.errors import TrainingError
    from posttrain.train.config.loader import RunSection

    @dataclass
    class ToyConfig:
        """Toy command."""
        steps: int = field(default=3, metadata={"help": "steps"})
        run: RunSection = field(default_factory=RunSection, metadata={"help": "run"})

    CALLS = []

    def run_toy(cfg):
        CALLS.append(cfg)
        if cfg.steps < 0:
            raise TrainingError("step 0: loss is NaN\\nsecond line")
        return {"steps": cfg.steps, "resumed": cfg.run.resume, "reward/mean": 0.123456}

    def plan(cfg):
        return f"would train {cfg.steps} steps into {cfg.run.output_dir}"
    '''
)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_cmd.py").write_text(TOY_MODULE)
    (tmp_path / "broken_cmd.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "toy", cli.Command("toy_cmd", "ToyConfig", "run_toy", "toy"))
    monkeypatch.setitem(cli.COMMANDS, "broken", cli.Command("broken_cmd", "X", "run_x", "broken"))
    monkeypatch.setitem(cli.COMMANDS, "noattr", cli.Command("toy_cmd", "ToyConfig", "run_nothing", "noattr"))
    import importlib

    monkeypatch.delitem(sys.modules, "toy_cmd", raising=False)
    return importlib.import_module("toy_cmd")


def test_run_saves_config_and_summary(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["toy", f"--run.output_dir={out}", "--steps", "5", "--resume"]) == 0
    cfg = toy.CALLS[-1]
    assert cfg.steps == 5 and cfg.run.resume is True
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 5 and saved["run"]["resume"] is True
    assert json.loads((out / "summary.json").read_text())["reward/mean"] == 0.123456
    assert "reward/mean: 0.1235" in capsys.readouterr().out


def test_dry_run_uses_plan(toy, tmp_path, capsys):
    assert cli.main(["toy", "--dry-run", "--steps", "7", f"--run.output_dir={tmp_path / 'x'}"]) == 0
    assert "would train 7 steps" in capsys.readouterr().out
    assert toy.CALLS == [] and not (tmp_path / "x").exists()


def test_errors_are_one_line_exit_2(toy, tmp_path, capsys):
    assert cli.main(["toy", "--steps", "-1", f"--run.output_dir={tmp_path / 'r'}"]) == 2
    assert capsys.readouterr().err == "error: step 0: loss is NaN second line\n"
    assert cli.main(["broken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command 'broken' is unavailable: cannot import broken_cmd")
    assert cli.main(["noattr"]) == 2
    assert "has no 'run_nothing'" in capsys.readouterr().err
    assert cli.main(["toy", "--config"]) == 2
    assert "--config needs a file path" in capsys.readouterr().err
    # one broken command module does not break the others
    assert cli.main(["toy", "--help"]) == 0
    assert "--run.seed  int  (default: 0)" in capsys.readouterr().out


def test_eval_end_to_end_in_process(tmp_path, capsys):
    out = tmp_path / "ev"
    code = cli.main(
        ["eval", "--model.preset", "tiny", "--data.n", "2", "--sampling.k", "2",
         "--sampling.max_new_tokens", "6", f"--output_dir={out}"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 2 and result["k"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert (out / "config.yaml").is_file() and len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert "accuracy" in capsys.readouterr().out


def test_report_command(tmp_path, capsys):
    from posttrain.train.common.metrics import MetricsLogger

    with MetricsLogger(tmp_path / "run") as log:
        for s in range(1, 4):
            log.log(s, {"reward/mean": s / 3, "loss/total": 1 / s})
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert (tmp_path / "run" / "report" / "reward.png").is_file()
    assert cli.main(["report", "--bogus"]) == 2
    assert "unknown option '--bogus'" in capsys.readouterr().err


def test_resume_warns_about_changed_config(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["toy", f"--run.output_dir={out}", "--steps", "5"]) == 0
    capsys.readouterr()
    assert cli.main(["toy", f"--run.output_dir={out}", "--steps", "5", "--resume"]) == 0
    assert "warning" not in capsys.readouterr().err  # only run.resume changed
    assert cli.main(["toy", f"--run.output_dir={out}", "--steps", "9", "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: resuming with a config that differs from") and err.rstrip().endswith(
        ": steps"
    )
