"""Learning with tools (issue #20), through the CLI as a user runs recipes/tools/: on
three-digit addition and subtraction, a tiny model that learned (SFT) to call a
calculator and was then GRPO-trained with it answers held-out problems far better than
its SFT start and than the same model and budget without tools, and keeps calling the tool.

The SFT start is the recipe's stage 1 stopped part-way (300 of its 400 steps: ~63% greedy,
~20% sampled held-out), as `posttrain demo` does for its own task: a start that is right on
some samples and wrong on others, so GRPO's groups carry a signal and there is room to
show. Measured with CI's 2 threads (docs/benchmarks.md, "Tool use"): 200 GRPO steps at the
recipe's settings take held-out accuracy 63% -> 77% greedy and 20% -> ~55% sampled; from the
full 400-step start 300 steps go 88% -> 91% greedy, 72% -> 87% sampled.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from posttrain import cli

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "tools"
SFT_STEPS = 300  # of the recipe's 400: a start with room (module docstring)
GRPO_STEPS = 200
NO_EVAL = ["--eval.every", "0", "--eval.before_after", "false"]


def _run(*args) -> None:
    assert cli.main([str(a) for a in args]) == 0


def _accuracy(model_dir: Path, tools: bool) -> dict[str, float]:
    """Held-out accuracy on 128 test problems: greedy, and sampled (T=1, 4 per problem);
    the tool-call rate of the sampled answers."""
    from posttrain.data.envs import make_env
    from posttrain.data.tasks import get_task
    from posttrain.engines.models import load_model, load_tokenizer
    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.multiturn import MultiTurnEngine
    from posttrain.train.evaluate import evaluate_policy

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer=tok)
    task = get_task("tool_arithmetic")
    examples = task.examples("test", 128, seed=0, difficulty=1)
    engine = make_engine("native", model, tok)
    if tools:
        engine = MultiTurnEngine(engine, tok, lambda: make_env("tools"), max_turns=2, max_total_tokens=160)
    torch.manual_seed(0)
    greedy = evaluate_policy(
        model, tok, examples, task, k=1, temperature=0.0, max_new_tokens=100, engine=engine
    )
    sampled = evaluate_policy(model, tok, examples, task, k=4, temperature=1.0, max_new_tokens=100, engine=engine,
                              seed=1, return_samples=True)  # fmt: skip
    calls = sum("<tool_call>" in s["completion"] for s in sampled["samples"]) / len(sampled["samples"])
    return {"greedy": greedy["accuracy"], "sampled": sampled["accuracy"], "calls": calls}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools")
    _run(
        "sft", "--config", RECIPES / "1_sft.yaml", "--train.steps", SFT_STEPS, "--run.output_dir", out / "sft"
    )
    _run("rl", "--config", RECIPES / "2_grpo.yaml", "--model.path", out / "sft" / "final", "--steps", GRPO_STEPS,
         *NO_EVAL, "--run.output_dir", out / "grpo")  # fmt: skip
    _run("sft", "--config", RECIPES / "3_sft_no_tools.yaml", "--train.steps", 200,
         "--run.output_dir", out / "sft_plain")  # fmt: skip
    _run("rl", "--config", RECIPES / "4_grpo_no_tools.yaml", "--model.path", out / "sft_plain" / "final",
         "--steps", 10, *NO_EVAL, "--run.output_dir", out / "grpo_plain")  # fmt: skip
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return {
        "sft": _accuracy(out / "sft" / "final", tools=True),
        "grpo": _accuracy(out / "grpo" / "final", tools=True),
        "plain": _accuracy(out / "grpo_plain" / "final", tools=False),
        "rows": rows,
        "grpo_dir": out / "grpo" / "final",
    }


def test_tool_use_beats_the_same_budget_without_tools(runs):
    steps = [r for r in runs["rows"] if "reward/mean" in r]
    assert len(steps) == GRPO_STEPS and all("tools/call_rate" in r and "tools/error_rate" in r for r in steps)
    assert runs["grpo"]["calls"] > 0.8, runs["grpo"]
    assert runs["grpo"]["greedy"] > runs["plain"]["greedy"] + 0.4, (runs["grpo"], runs["plain"])
    assert runs["grpo"]["sampled"] > runs["plain"]["sampled"] + 0.2, (runs["grpo"], runs["plain"])


def test_grpo_raises_accuracy_above_the_tool_using_sft_start(runs):
    """Measured: greedy 0.63 -> 0.77, sampled 0.20 -> ~0.55 (module docstring); the floors
    leave a 2x margin on the sampled gain and ask the greedy answer to improve too."""
    sft, grpo = runs["sft"], runs["grpo"]
    assert grpo["sampled"] > sft["sampled"] + 0.15, (sft, grpo)
    assert grpo["greedy"] > sft["greedy"] + 0.05, (sft, grpo)


def test_the_tool_using_policy_answers_with_what_the_tool_returned(runs, monkeypatch):
    """The held-out wins come from the tool, not from arithmetic in the model's head: with a
    calculator that lies (every result + 37), the GRPO policy's greedy answers repeat the
    false result, and almost never the true sum. (Measured on the SFT start with a direct
    probe: 61% repeat a random false result, 0% give the true sum.)"""
    from posttrain.data.envs import make_env
    from posttrain.data.envs import tools as tools_module
    from posttrain.data.tasks import get_task
    from posttrain.engines.models import load_model, load_tokenizer
    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.multiturn import MultiTurnEngine
    from posttrain.train.evaluate import evaluate_policy

    honest = tools_module.calculate
    monkeypatch.setattr(tools_module, "calculate", lambda expression: str(int(honest(expression)) + 37))
    tok = load_tokenizer(str(runs["grpo_dir"]))
    model = load_model(str(runs["grpo_dir"]), tokenizer=tok)
    task = get_task("tool_arithmetic")
    examples = task.examples("test", 64, seed=0, difficulty=1)
    engine = MultiTurnEngine(make_engine("native", model, tok), tok, lambda: make_env("tools"), max_turns=2,
                             max_total_tokens=160)  # fmt: skip
    out = evaluate_policy(model, tok, examples, task, k=1, temperature=0.0, max_new_tokens=100, engine=engine,
                          return_samples=True)  # fmt: skip
    follows = true_sum = 0
    for sample, example in zip(out["samples"], examples, strict=True):
        said = re.search(r"tool\n(-?\d+)<\|im_end\|>", sample["completion"])
        answer = re.search(r"<answer>(.*?)</answer>", sample["completion"])
        follows += bool(said and answer and answer.group(1) == said.group(1))
        true_sum += bool(answer and answer.group(1) == example.answer)
    assert follows / len(examples) > 0.4 and true_sum / len(examples) < 0.1, (follows, true_sum)
