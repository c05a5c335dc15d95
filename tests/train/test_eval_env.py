"""`posttrain eval` with an `env:` section (train/eval_env.py): a tool-using model evaluated
on the tool task through the multi-turn driver, with accuracy, tool-call rate, tool-error
rate and turns; bad env settings are one-line errors before any model is built."""

import json
import re

import pytest
import torch

from posttrain import cli
from posttrain.engines.rollout import ENGINES
from posttrain.engines.rollout.base import Rollout

ENV = ["--data.task", "tool_arithmetic", "--data.difficulty", "1", "--env.name", "tools",
       "--env.tools", "[calculator]", "--env.max_turns", "2", "--env.max_total_tokens", "200"]  # fmt: skip


class CallsThenAnswers:
    """A scripted policy: turn 1 calls the calculator on the prompt's expression (on 1/0
    for the first prompt: a tool error), turn 2 answers with the last number it was shown."""

    def __init__(self, model, tokenizer):
        self.tok, self.calls, self.prompts = tokenizer, 0, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        first_turn = self.calls % 2 == 0
        self.calls += 1
        self.prompts.append([self.tok.decode(p, skip_special_tokens=False) for p in prompts])
        rows = []
        for j, text in enumerate(self.prompts[-1]):
            for _ in range(params.n):
                if first_turn:
                    expr = "1/0" if j == 0 else re.search(r"What is (.+?)\?", text).group(1)
                    call = {"name": "calculator", "arguments": {"expression": expr}}
                    out = "<tool_call>" + json.dumps(call) + "</tool_call>"
                    rows.append(self.tok(out, add_special_tokens=False)["input_ids"])
                else:
                    out = f"<answer>{re.findall(r'-?[0-9]+', text)[-1]}</answer>"
                    rows.append(
                        self.tok(out, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                    )
        T = max(map(len, rows))
        ids, mask = torch.zeros((len(rows), T), dtype=torch.long), torch.zeros((len(rows), T))
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in rows]
        return Rollout([list(p) for p in prompts for _ in range(params.n)], ids, mask, -0.5 * mask,
                       ["stop"] * len(rows), torch.arange(len(prompts)).repeat_interleave(params.n), texts)  # fmt: skip


def test_eval_with_env_scores_tool_use_through_the_cli(tmp_path, monkeypatch, capsys):
    import posttrain.train.evaluate as evaluate

    engines, declared = [], []
    render = evaluate.encode_prompt
    monkeypatch.setattr(
        evaluate,
        "encode_prompt",
        lambda *a, tools=None, **k: declared.append(tools) or render(*a, tools=tools, **k),
    )
    monkeypatch.setitem(
        ENGINES._items, "native", lambda m, t, **kw: engines.append(CallsThenAnswers(m, t)) or engines[-1]
    )
    out = tmp_path / "ev"
    args = [
        "eval",
        "--model.preset",
        "tiny",
        "--data.n",
        "3",
        "--sampling.k",
        "2",
        *ENV,
        f"--output_dir={out}",
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    # 3 prompts x 2 samples, one call each; the first prompt's 2 calls fail (1/0), so its answers are wrong.
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["tools/call_rate"] == 1.0 and result["tools/calls_per_sample"] == 1.0
    assert result["tools/error_rate"] == pytest.approx(2 / 6)
    assert result["tools/turns_mean"] == 2.0 and result["env/return_mean"] == 0.0
    (policy,) = engines
    first, second = policy.prompts
    # The tool is declared to the chat template (the char tokenizer's template does not show it).
    assert len(declared) == 3 and all([t["function"]["name"] for t in d] == ["calculator"] for d in declared)
    # Turn 2 saw exactly turn 1's prompt, the call and the tool's result (the calculator's value).
    assert second[2].startswith(first[1]) and "error: division by zero" in second[0]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [False, False, True, True, True, True]
    assert "<tool_call>" in samples[2]["completion"] and "tools/call_rate" in capsys.readouterr().out


def test_eval_with_env_runs_a_real_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--model.preset", "tiny", "--data.n", "2", "--sampling.k", "2", "--sampling.max_new_tokens",
            "8", *ENV, f"--output_dir={out}"]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 2 and 1.0 <= result["tools/turns_mean"] <= 2.0
    assert (
        0.0 <= result["tools/call_rate"] <= 1.0 and len((out / "samples.jsonl").read_text().splitlines()) == 4
    )


# override -> the start of its one-line error
BAD_ENV = {
    "--env.name=bogus": "env.name: unknown environment 'bogus'",
    "--env.tools=[abacus]": "env.tools[0]: unknown",
    "--env.options={colour: red}": "env.options: unknown option(s) colour",
    "--env.max_turns=0": "env.max_turns and env.max_total_tokens must be >= 1",
    "--env.dense_rewards=true": "env.dense_rewards: posttrain eval trains nothing",
    "--sampling.thinking_budget=4": "sampling.thinking_budget is not supported with a multi-turn",
}


@pytest.mark.parametrize("override", sorted(BAD_ENV))
def test_bad_env_settings_are_one_line_errors_before_any_model(tmp_path, monkeypatch, capsys, override):
    import posttrain.train.common.loading as loading

    monkeypatch.setattr(loading, "load_policy", lambda *a, **k: pytest.fail("a model was built"))
    assert cli.main(["eval", "--model.preset", "tiny", *ENV, override, f"--output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert BAD_ENV[override] in err and len(err.splitlines()) == 1, err
