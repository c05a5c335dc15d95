"""Long-number arithmetic where calling a calculator is the winning move (tool use).

Difficulty sets the operand size: 1: 3 digits, 2: 4 digits, 3: 5 digits, 4: 6 digits
(+ and −; level 4 also ×, with a 2-digit factor). A tiny model that learned to copy
digits into a tool call and the result into its answer solves every level; one that
must add five-digit numbers in its head solves almost none.

Two solution styles (option `tools`):

- tools=True (default): one calculator call, then the answer, in the model's own stream
  exactly as a multi-turn rollout lays it out for the built-in character tokenizer's
  chat template (the call, the template's tool message, the answer turn):

      <tool_call>{"name": "calculator", "arguments": {"expression": "48213+90577"}}</tool_call>
      <|im_end|>\\n<|im_start|>tool\\n138790<|im_end|>\\n<|im_start|>assistant\\n<answer>138790</answer>

  so `posttrain sft` on these rows teaches the call format the `tools` environment
  answers (a test checks the layout against `observation_text`). For another tokenizer,
  build demonstrations with `tool_transcript(..., tokenizer=...)`.
- tools=False: the answer alone (``<answer>138790</answer>``): the no-tool baseline.

`tool_fraction` (with tools=True) mixes the two: that share of the problems (chosen by a
hash of the problem, so the same problems in every split and seed) get the calculator
transcript, the rest the bare answer. SFT on such a mix gives a policy that calls the
tool only sometimes; RL can then learn *when* calling pays (tools/call_rate rises with
accuracy), which is what the learning test measures.

The wrong solution is the same with the answer off by one digit in one place.
"""

from __future__ import annotations

import hashlib
import json
import random

from posttrain.data.tasks.base import Example, Problem, Task
from posttrain.errors import ConfigError

# What the character tokenizer's chat template puts between a model turn and the next
# assistant turn when a tool message comes back (engines/rollout/multiturn.py).
CHAR_TEMPLATE_TOOL_MESSAGE = "<|im_end|>\n<|im_start|>tool\n{result}<|im_end|>\n<|im_start|>assistant\n"

# level -> (digits of each operand, operators)
LEVELS = {1: (3, "+-"), 2: (4, "+-"), 3: (5, "+-"), 4: (6, "+-*")}


def tool_call_text(expression: str) -> str:
    """The calculator call in the format data/envs/tools.py parses."""
    return (
        "<tool_call>"
        + json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        + "</tool_call>"
    )


def tool_transcript(expression: str, result: str, final: str, *, tokenizer=None) -> str:
    """A one-call demonstration: call, tool message, answer. With `tokenizer`, the tool
    message is rendered by its chat template (as the rollout does); default: the
    character tokenizer's template."""
    call = tool_call_text(expression)
    if tokenizer is None:
        middle = CHAR_TEMPLATE_TOOL_MESSAGE.format(result=result)
    else:
        from posttrain.engines.rollout.multiturn import observation_text

        middle = observation_text(tokenizer, [{"role": "user", "content": ""}, {"role": "assistant", "content": call}],
                                  result)  # fmt: skip
    return f"{call}{middle}<answer>{final}</answer>"


class ToolArithmetic(Task):
    """See module docstring. Options: tools (bool, default True), tool_fraction (float in
    [0, 1], default 1: share of problems whose solution calls the calculator)."""

    name = "tool_arithmetic"
    max_difficulty = 4

    def __init__(self, *, tools: bool = True, tool_fraction: float = 1.0, **kw):
        super().__init__(**kw)
        if not 0.0 <= float(tool_fraction) <= 1.0:
            raise ConfigError(f"task tool_arithmetic: tool_fraction must be in [0, 1], got {tool_fraction}")
        self.tools = bool(tools)
        self.tool_fraction = float(tool_fraction)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        digits, ops = LEVELS[difficulty]
        op = rng.choice(ops)
        a = rng.randint(10 ** (digits - 1), 10**digits - 1)
        b = rng.randint(10, 99) if op == "*" else rng.randint(10 ** (digits - 1), 10**digits - 1)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        expr = f"{a}{op}{b}"
        wrong = _slip(value, rng)
        return Problem(key=expr, prompt=f"What is {expr}?", answer=str(value), final=str(value),
                       steps=[expr], wrong_steps=[expr], wrong_labels=[False], wrong_final=str(wrong))  # fmt: skip

    def check(self, predicted: str, answer: str) -> bool:
        return predicted.strip().replace(",", "") == answer.strip()

    def examples(self, split: str, n: int, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        out = super().examples(split, n, seed=seed, difficulty=difficulty)
        for ex in out:
            expr = ex.prompt[len("What is ") : -1]
            wrong = ex.wrong_solution.split("<answer>")[1].split("</answer>")[0]
            if self.tools and _share(expr) < self.tool_fraction:
                ex.solution = tool_transcript(expr, ex.answer, ex.answer)
                ex.wrong_solution = tool_transcript(expr, ex.answer, wrong)
            else:
                ex.solution, ex.wrong_solution = f"<answer>{ex.answer}</answer>", f"<answer>{wrong}</answer>"
        return out


def _share(key: str) -> float:
    """A uniform number in [0, 1) fixed by the problem (which problems get a tool transcript)."""
    return int.from_bytes(hashlib.sha256(f"tool_fraction|{key}".encode()).digest()[:8], "big") / 2**64


def _slip(value: int, rng: random.Random) -> int:
    """`value` with one digit changed by ±1 (never equal to it)."""
    digits = list(str(abs(value)))
    i = rng.randrange(len(digits))
    d = int(digits[i])
    digits[i] = str(d + 1 if d < 9 else d - 1)
    out = int("".join(digits))
    return -out if value < 0 else out
