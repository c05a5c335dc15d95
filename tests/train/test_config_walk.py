"""Every config field of every command with a config (rl, sft, rm, prm, dpo, eval, demo,
bench) reaches the code (issue #16, item 6).

A field is "read" when code outside the config machinery (train/config/loader.py: loading,
saving, printing) reads it while the command builds and runs. Each command runs a tiny
configuration per mode (task / dataset file, LoRA, critic, teacher, ...) so that fields
read only in one mode are read in some run; the union must cover every key the command
accepts, except the few read only on a rare event, listed below with the test that
exercises them. For `posttrain rl` the resolved method pieces (`algo.*`) are also tracked
as the loop reads them from the resolved RLSpec.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from posttrain.train.config.loader import load_config, valid_keys
from rl_common import tiny_config

# Read only after a non-finite loss: tests/train/rl/test_rl_loop.py::test_non_finite_loss_skips_step_and_stops_after_k
# and tests/train/offline/test_offline.py (skipped non-finite steps).
ON_EVENT = {"run.max_bad_steps"}
# Read only when a reward-hacking alert fires: tests/train/rl/test_rl_alerts.py (alerts.stop ends the run).
ON_EVENT |= {"alerts.stop"}
_CONFIG_CODE = (str(Path("posttrain", "train", "config.py")), "dataclasses.py")


def _track(obj, prefix: str, seen: set[str]) -> None:
    """Record into `seen` every dotted field of `obj` (sections and lists of sections
    included) that code outside train/config/loader.py reads from now on."""
    if isinstance(obj, list):
        for x in obj:
            _track(x, prefix, seen)
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    names = {f.name for f in dataclasses.fields(obj)}
    for name in names:
        _track(object.__getattribute__(obj, name), f"{prefix}{name}.", seen)

    def getattribute(self, name, _names=names, _prefix=prefix):
        if name in _names and not sys._getframe(1).f_code.co_filename.endswith(_CONFIG_CODE):
            seen.add(_prefix + name)
        return object.__getattribute__(self, name)

    base = type(obj)
    obj.__class__ = type(base.__name__, (base,), {"__getattribute__": getattribute})


def _tracked_spec(spec, seen: set[str]):
    """A copy of the resolved RLSpec that records which of its fields the loop reads."""
    names = {f.name for f in dataclasses.fields(spec)}

    class Tracked(type(spec)):
        def __getattribute__(self, name):
            if name in names:
                seen.add(f"algo.{name}")
            return object.__getattribute__(self, name)

    return Tracked(**{name: getattr(spec, name) for name in names})


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_rl_field_and_piece_is_read(tmp_path, monkeypatch):
    import posttrain.train.rl.controller as rl
    from posttrain.algos.presets import PIECE_DEFAULTS
    from posttrain.train.rl.controller import RLConfig, RLTrainer

    # One over-long prompt (skipped: data.long_prompts) among short ones.
    rows = [{"prompt": f"{i}+1=" + "x" * (30 * (i == 0)), "answer": str(i + 1)} for i in range(12)]
    data = _jsonl(tmp_path / "prompts.jsonl", rows)
    runs = {
        "grpo": ["data.n_test=4", "eval.every=1", "eval.n=2", "sample_log_every=1", "model.lora_r=2"],
        "ppo": [
            f"data.path={data}", f"data.test_path={data}", "data.prompt_column=prompt",
            "data.max_prompt_tokens=40", "data.long_prompts=skip", "critic.preset=tiny", "critic.lr=1e-3",
            "algo.kl_target=0.1", "algo.tis_cap=2.0", "algo.dynamic_sampling=true",
        ],
        "on_policy_distill": ["teacher.preset=tiny"],
        "kdrl": ["teacher.preset=tiny"],
        "trpo": [],
        "dr_grpo": ["env.name=tools", "env.tools=[calculator]", "env.max_turns=2", "env.max_total_tokens=32",
                    "env.options={error_reward: 0.0}"],
        "gspo": ["rollout.thinking_budget=4", "rollout.thinking_end_phrase=Enough."],
    }  # fmt: skip
    seen: set[str] = set()
    pieces: set[str] = set()
    validate = rl.validate
    monkeypatch.setattr(rl, "validate", lambda cfg: _tracked_spec(validate(cfg), pieces))
    for method, extra in runs.items():
        cfg = tiny_config(tmp_path / method, method, *extra, steps=1)
        _track(cfg, "", seen)
        RLTrainer(cfg).train()
    assert sorted(set(valid_keys(RLConfig)) - seen - ON_EVENT) == []
    assert sorted({f"algo.{k}" for k in PIECE_DEFAULTS} - pieces) == []


OFFLINE_TINY = [
    "--train.steps", "2", "--train.batch_size", "4", "--train.micro_batch_size", "2", "--train.eval_every", "2",
    "--data.n_train", "16", "--data.n_eval", "4", "--optim.warmup_steps", "0",
]  # fmt: skip
POLICY_TINY = ["--train.eval_generations", "2", "--train.max_new_tokens", "4"]


def _offline_rows(kind: str) -> list[dict]:
    rows = []
    for i in range(12):
        prompt = f"{i}+1=" + "x" * (60 * (i == 0))  # row 0 is over data.max_prompt_tokens (skipped)
        if kind == "sft":
            rows.append({"prompt": prompt, "completion": f"<answer>{i + 1}</answer>"})
        elif kind == "prm":
            rows.append(
                {"prompt": prompt, "completions": [f"{i}+1", f"={i + 1}"], "labels": [True, i % 2 == 0]}
            )
        else:
            rows.append(
                {"prompt": prompt, "chosen": f"<answer>{i + 1}</answer>", "rejected": f"<answer>{i}</answer>"}
            )
    return rows


@pytest.mark.parametrize("command", ["sft", "rm", "prm", "dpo"])
def test_every_offline_field_is_read(command, tmp_path, monkeypatch):
    from posttrain.data.tasks.arithmetic import Arithmetic
    from posttrain.train import offline

    # data.pairs=self needs mixed outcomes from a random policy: even length = "correct".
    monkeypatch.setattr(Arithmetic, "score", lambda self, text, answer: float(len(text) % 2 == 0))

    cls, run = {
        "sft": (offline.SFTConfig, offline.run_sft),
        "rm": (offline.RMConfig, offline.run_rm),
        "prm": (offline.PRMConfig, offline.run_prm),
        "dpo": (offline.DPOConfig, offline.run_dpo),
    }[command]
    rows = _offline_rows(command)
    path = _jsonl(tmp_path / "train.jsonl", rows)
    held_out = _jsonl(tmp_path / "held_out.jsonl", rows[1:5])
    policy = POLICY_TINY if command in ("sft", "dpo") else []
    task_mode = {
        "sft": ["--model.lora_r", "2", "--algo.packing", "true", "--train.eval_temperature", "1.0",
                "--train.eval_samples", "2"],
        "dpo": ["--data.pairs", "self", "--data.samples_per_prompt", "4", "--data.pairs_per_prompt", "2",
                "--data.sample_max_new_tokens", "12", "--data.keep_truncated", "true", "--model.lora_r", "2",
                "--train.eval_temperature", "1.0", "--train.eval_samples", "2"],
    }.get(command, [])  # fmt: skip
    file_mode = [
        "--data.path", path, "--data.task", "null", "--data.max_prompt_tokens", "40", "--data.too_long", "skip",
        "--train.steps", "0", "--train.epochs", "0.5",
    ]  # fmt: skip
    modes = {
        "task": task_mode,
        "file": file_mode,
        "file_eval_path": [*file_mode, "--data.eval_path", held_out],
    }
    if command == "rm":  # pointwise regression on the task's scored rows
        modes["pointwise"] = ["--algo.loss", "pointwise", "--algo.baseline", "prompt_mean"]
    if command == "dpo":  # long-vs-short pairs from sampled completions (Kimi long2short)
        samples = [{"prompt": f"{i}+1=", "completion": c, "correct": ok}
                   for i in range(6) for c, ok in ((f"<answer>{i + 1}</answer>", True),
                                                   (f"<think>{i}+1</think><answer>{i}</answer>", False))]  # fmt: skip
        modes["long_short"] = ["--data.path", _jsonl(tmp_path / "samples.jsonl", samples), "--data.task", "null",
                               "--data.pairs", "long_short", "--data.long_ratio", "1.5"]  # fmt: skip
    seen: set[str] = set()
    for mode, extra in modes.items():
        args = ["--run.output_dir", str(tmp_path / mode), *OFFLINE_TINY, *policy, *extra]
        if command == "dpo":
            args += ["--ref.cache_dir", str(tmp_path / mode / "cache")]
        cfg = load_config(cls, None, args)
        _track(cfg, "", seen)
        run(cfg)
    assert sorted(set(valid_keys(cls)) - seen - ON_EVENT) == []


def test_every_eval_field_is_read(tmp_path):
    from posttrain.engines.models import build_preset, build_value_model, save_value_model
    from posttrain.engines.tokenizer import build_char_tokenizer
    from posttrain.train.evaluate import EvalConfig, run_eval

    tok = build_char_tokenizer()
    for name in ("orm", "prm"):
        save_value_model(
            build_value_model(build_preset("tiny", vocab_size=len(tok)), tokenizer=tok),
            tok,
            str(tmp_path / name),
        )
    rows = _jsonl(tmp_path / "rows.jsonl", [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(3)])
    small = ["--data.n", "2", "--sampling.k", "2", "--sampling.max_new_tokens", "4"]
    modes = {
        "task": ["--scorer.orm", str(tmp_path / "orm"), "--scorer.prm", str(tmp_path / "prm"),
                 "--scorer.prm_aggregate", "last", "--sampling.thinking_budget", "2",
                 "--sampling.thinking_end_phrase", "Enough."],
        "file": ["--data.path", rows, "--data.task", "null", "--data.prompt_column", "q", "--data.answer_column", "a"],
        "env": ["--data.task", "tool_arithmetic", "--env.name", "tools", "--env.tools", "[calculator]",
                "--env.options", "{}", "--env.max_turns", "2", "--env.max_total_tokens", "40"],
    }  # fmt: skip
    seen: set[str] = set()
    for mode, extra in modes.items():
        cfg = load_config(EvalConfig, None, ["--output_dir", str(tmp_path / mode), *small, *extra])
        _track(cfg, "", seen)
        run_eval(cfg)
    # env.dense_rewards is only ever refused (eval trains nothing): read by check_eval_env at load.
    assert sorted(set(valid_keys(EvalConfig)) - seen - {"env.dense_rewards"}) == []


def test_every_demo_field_is_read_and_run_settings_reach_both_stages(tmp_path):
    from posttrain.train.demo import DemoConfig, _stage_configs, run_demo

    args = [
        "--sft_steps", "3", "--sft_examples", "16", "--sft_batch_size", "8", "--rl_steps", "2",
        "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--eval_n", "4",
        "--eval_every", "1", "--run.output_dir", str(tmp_path / "demo"),
    ]  # fmt: skip
    cfg = load_config(DemoConfig, None, args)
    seen: set[str] = set()
    _track(cfg, "", seen)
    run_demo(cfg)
    assert sorted(set(valid_keys(DemoConfig)) - seen) == []
    cfg = load_config(
        DemoConfig, None, [*args, "--run.log_every", "3", "--run.wandb_project", "p", "--run.seed", "7"]
    )
    for stage in _stage_configs(cfg, tmp_path / "demo2"):
        assert (stage.run.log_every, stage.run.wandb_project, stage.run.seed) == (3, "p", 7)


def test_every_bench_field_is_read(tmp_path):
    from trlbench.bench import BenchConfig, run_bench

    common = ["presets=[tiny]", "threads=1", "isolate=false", "n_train=16", "max_new_tokens=8"]
    modes = {
        "step": ["frameworks=[posttrain]", "steps=2", "skip_steps=1"],
        "accuracy": [
            "mode=accuracy", "frameworks=[posttrain]", "difficulty=2", "accuracy.sft_steps=2",
            "accuracy.sft_examples=16", "accuracy.sft_batch_size=4", "accuracy.n_eval=4", "accuracy.eval_every=1",
            "accuracy.max_steps=2", "accuracy.target=null", "accuracy.target_gain=0.5",
        ],
        "rollout": ["mode=rollout", "rollout.batch=4", "rollout.new_tokens=4", "rollout.repeats=1"],
    }  # fmt: skip
    seen: set[str] = set()
    for mode, extra in modes.items():
        cfg = load_config(BenchConfig, None, [*common, *extra, f"run.output_dir={tmp_path / mode}"])
        _track(cfg, "", seen)
        run_bench(cfg)
    assert sorted(set(valid_keys(BenchConfig)) - seen) == []
