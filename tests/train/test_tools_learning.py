"""Learning with tools (issue #20): on long-number arithmetic, GRPO with a calculator the
model calls mid-answer raises held-out accuracy above its SFT start, by learning *when*
to call (the tool-call rate rises), and ends well above the same budget spent without
tools. Everything runs through the CLI as a user would (recipes/tools/).

The SFT start calls the tool on half the problems (`tool_fraction: 0.5`): its bare
answers are mostly wrong and its calls mostly right, so the signal GRPO needs is there
from step 0. Measured numbers are in docs/benchmarks.md ("Tool use").
"""

import json
from pathlib import Path

import pytest
import torch

from posttrain import cli

pytestmark = pytest.mark.slow

SFT_STEPS, RL_STEPS, LR = "300", "40", "1e-4"
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tools"


def _accuracy(model_dir, tools: bool) -> tuple[float, float]:
    """(sampled held-out accuracy, tool-call rate) at T=1, 2 samples x 64 test problems."""
    from posttrain.data.envs import make_env
    from posttrain.data.tasks import get_task
    from posttrain.engines.models import load_model, load_tokenizer
    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.multiturn import MultiTurnEngine
    from posttrain.train.evaluate import evaluate_policy

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer=tok)
    task = get_task("tool_arithmetic")
    examples = task.examples("test", 64, seed=0, difficulty=1)
    engine = make_engine("native", model, tok)
    if tools:
        engine = MultiTurnEngine(engine, tok, lambda: make_env("tools"), max_turns=2, max_total_tokens=160)
    torch.manual_seed(0)
    out = evaluate_policy(model, tok, examples, task, k=2, temperature=1.0, max_new_tokens=100, engine=engine,
                          seed=1, return_samples=True)  # fmt: skip
    calls = sum("<tool_call>" in s["completion"] for s in out["samples"]) / len(out["samples"])
    return out["accuracy"], calls


def _run(*args):
    assert cli.main(list(args)) == 0


def test_grpo_with_a_calculator_learns_when_to_call_it(tmp_path):
    mix, rl = tmp_path / "mix_sft", tmp_path / "mix_rl"
    _run("sft", "--config", str(RECIPES / "1_sft.yaml"), "--data.task_options", "{tools: true, tool_fraction: 0.5}",
         "--train.steps", SFT_STEPS, "--run.output_dir", str(mix))  # fmt: skip
    _run("rl", "--config", str(RECIPES / "2_grpo.yaml"), "--model.path", str(mix / "final"), "--steps", RL_STEPS,
         "--optim.lr", LR, "--eval.every", "0", "--eval.before_after", "false", "--run.output_dir", str(rl))  # fmt: skip
    rows = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
    assert all("tools/call_rate" in r and "tools/error_rate" in r for r in rows if "reward/mean" in r)
    start_acc, start_calls = _accuracy(mix / "final", tools=True)
    end_acc, end_calls = _accuracy(rl / "final", tools=True)
    assert end_calls > start_calls + 0.15, (start_calls, end_calls)
    assert end_acc > start_acc + 0.10, (start_acc, end_acc)

    plain, plain_rl = tmp_path / "nt_sft", tmp_path / "nt_rl"
    _run("sft", "--config", str(RECIPES / "3_sft_no_tools.yaml"), "--train.steps", SFT_STEPS,
         "--run.output_dir", str(plain))  # fmt: skip
    _run("rl", "--config", str(RECIPES / "4_grpo_no_tools.yaml"), "--model.path", str(plain / "final"),
         "--steps", RL_STEPS, "--optim.lr", LR, "--eval.every", "0", "--eval.before_after", "false",
         "--run.output_dir", str(plain_rl))  # fmt: skip
    no_tool_acc, _ = _accuracy(plain_rl / "final", tools=False)
    assert end_acc > no_tool_acc + 0.20, (end_acc, no_tool_acc)
