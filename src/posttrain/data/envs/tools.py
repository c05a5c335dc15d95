"""Tools a model can call mid-answer: a declaration (name, schema, Python function) and
the two built-ins, a calculator and a sandboxed Python interpreter.

A tool is declared by a plain function and its JSON schema, in the shape transformers'
chat templates take (``apply_chat_template(messages, tools=[schema, ...])``), so a real
model's template renders the declarations the way it was trained to read them. A call
arrives as the Hermes / Qwen2.5 format those templates teach,

    <tool_call>{"name": "calculator", "arguments": {"expression": "48213+90577"}}</tool_call>

and its result goes back as a ``tool`` message. Every failure — unparsable call, unknown
tool, bad arguments, the tool raising or timing out — becomes an observation that starts
with ``error:``; a tool never crashes the rollout.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.core.registry import Registry

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
# Results are cut here so one call cannot flood the context (the model sees the cut).
MAX_RESULT_CHARS = 512


class ToolError(Exception):
    """A call the tool cannot answer; its message is shown to the model."""


@dataclass(frozen=True)
class Tool:
    """A callable tool: ``fn(**arguments) -> str``; `parameters` is its JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str] = field(compare=False)

    def schema(self) -> dict[str, Any]:
        """The declaration in the format transformers' chat templates render."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}  # fmt: skip


def string_parameter(name: str, description: str) -> dict[str, Any]:
    """The JSON schema of a tool's arguments when it takes one required string, `name`."""
    return {"type": "object", "properties": {name: {"type": "string", "description": description}},
            "required": [name]}  # fmt: skip


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `error` is set when the call could not be parsed."""

    name: str | None
    arguments: dict[str, Any]
    error: str | None = None


def parse_tool_call(text: str) -> ToolCall | None:
    """The first ``<tool_call>{json}</tool_call>`` in a model turn; None if there is none."""
    m = TOOL_CALL.search(text)
    if m is None:
        return None
    try:
        body = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        return ToolCall(None, {}, f"error: tool call is not valid JSON ({e.msg})")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return ToolCall(None, {}, 'error: a tool call needs {"name": ..., "arguments": {...}}')
    args = body.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return ToolCall(body["name"], {}, "error: arguments are not valid JSON")
    if not isinstance(args, dict):
        return ToolCall(body["name"], {}, "error: arguments must be a JSON object")
    return ToolCall(body["name"], args)


def call_tool(tools: dict[str, Tool], call: ToolCall) -> tuple[str, bool]:
    """(observation text, ok). Never raises for anything the model wrote."""
    if call.error is not None:
        return call.error, False
    tool = tools.get(call.name or "")
    if tool is None:
        return f"error: unknown tool {call.name!r}; available: {', '.join(sorted(tools))}", False
    try:
        result = tool.fn(**call.arguments)
    except ToolError as e:
        return f"error: {e}", False
    except TypeError as e:  # wrong or missing argument names
        return f"error: bad arguments for {tool.name}: {e}", False
    result = str(result)
    if len(result) > MAX_RESULT_CHARS:
        result = result[:MAX_RESULT_CHARS] + "...(truncated)"
    return result, True


# --------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Bounds that keep one expression cheap: |exponent| and operand size for **, digits overall.
MAX_EXPONENT = 64
MAX_DIGITS = 200


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 10**6):
            raise ToolError(f"exponent too large (|b| <= {MAX_EXPONENT} in a**b)")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, int) and len(str(abs(value))) > MAX_DIGITS:
            raise ToolError(f"result has more than {MAX_DIGITS} digits")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")


def calculate(expression: str) -> str:
    """Exact arithmetic on one expression (integers stay integers; 7/2 = 3.5)."""
    if not isinstance(expression, str) or len(expression) > 256:
        raise ToolError("expression must be a string of at most 256 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r}") from None
    value = _eval(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("result is not finite")
        return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return str(value)


def calculator_tool() -> Tool:
    return Tool(
        "calculator",
        "Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses.",
        string_parameter("expression", "e.g. 48213+90577"),
        calculate,
    )


# --------------------------------------------------------------------------- python


def python_tool(wall_time_s: float = 4.0, memory_mb: int = 256, backend: str = "auto") -> Tool:
    """Run a Python program in the sandbox (data/sandbox.py): the same isolation as the code
    reward — no network, no host files, its own deadline — and return what it printed."""
    from posttrain.data.sandbox import SandboxLimits, run_program

    limits = SandboxLimits(cpu_time_s=max(1, int(wall_time_s)), wall_time_s=wall_time_s, memory_mb=memory_mb,
                           max_output_bytes=1 << 16)  # fmt: skip

    def run_python(code: str) -> str:
        if not isinstance(code, str):
            raise ToolError("code must be a string")
        result = run_program(code, limits=limits, backend=backend)
        if result.status == "ok":
            return result.stdout
        tail = (result.stderr.strip().splitlines() or [result.status])[-1]
        raise ToolError(f"{result.status}: {tail}")

    return Tool(
        "python",
        "Run a Python program (standard library only, no files or network) and return its printed output.",
        string_parameter("code", "a complete program"),
        run_python,
    )


TOOLS: Registry = Registry("tool")
TOOLS.register("calculator")(calculator_tool)
TOOLS.register("python")(python_tool)


def build_tools(names: list[str], options: dict[str, dict] | None = None) -> dict[str, Tool]:
    """Tools by registry name (unknown names list the valid ones); options per tool name."""
    options = options or {}
    return {name: TOOLS[name](**options.get(name, {})) for name in names}
