"""Environments for multi-turn rollouts: the model acts, the environment answers.

An environment is anything with

    reset(row) -> None                  # a new episode for one dataset row (prompt, answer, columns)
    step(turn_text) -> EnvStep          # the model's turn in, the next observation out
    tool_schemas() -> list[dict]        # tool declarations rendered into the prompt ([] if none)

and optionally ``observation_role`` ("tool" by default; "user" for a game's messages),
``gives_rewards`` (its steps carry rewards the run must use) and ``dataset_rows(split, n,
seed)`` (prompt rows of its own, e.g. a game's opening observations).

The rollout engine (`engines/rollout/multiturn.py`) owns the tokens: it samples each
turn, asks the environment for the observation *text*, renders it as a ``tool`` message
of the tokenizer's chat template and appends those ids — the model's own tokens are
never decoded and re-encoded. `ToolEnv` is the built-in: a turn with a tool call gets
the tool's result back; a turn without one is the final answer and ends the episode.
Trajectory rewards come from the run's reward functions on the whole transcript;
`EnvStep.reward` adds a per-turn reward at the turn's last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from posttrain.core.registry import Registry
from posttrain.data.envs.tools import Tool, build_tools, call_tool, parse_tool_call


@dataclass(frozen=True)
class EnvStep:
    """The environment's answer to one model turn.

    observation: text returned to the model as a tool message; None ends the episode.
    reward: per-turn reward, placed at the last token of the turn (0 = none).
    tool_call / tool_error: whether the turn called a tool, and whether that call failed.
    """

    observation: str | None
    reward: float = 0.0
    tool_call: bool = False
    tool_error: bool = False

    @property
    def done(self) -> bool:
        return self.observation is None


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> None: ...

    def step(self, turn: str) -> EnvStep: ...

    def tool_schemas(self) -> list[dict[str, Any]]: ...


class ToolEnv:
    """Tool use: each turn may call one tool (``<tool_call>{json}</tool_call>``); the first
    turn without a call is the answer. error_reward: per-turn reward of a failed call
    (0 = none; the trajectory reward already pays only right answers)."""

    observation_role = "tool"

    def __init__(self, tools: dict[str, Tool], *, error_reward: float = 0.0):
        if not tools:
            raise ValueError("ToolEnv needs at least one tool")
        self.tools = tools
        self.error_reward = error_reward

    @property
    def gives_rewards(self) -> bool:
        """Whether steps carry rewards (the run must then use them: env_return or dense)."""
        return self.error_reward != 0

    def reset(self, row: dict[str, Any]) -> None:
        """Tool use keeps no per-episode state."""

    def step(self, turn: str) -> EnvStep:
        call = parse_tool_call(turn)
        if call is None:
            return EnvStep(None)
        text, ok = call_tool(self.tools, call)
        return EnvStep(text, reward=0.0 if ok else self.error_reward, tool_call=True, tool_error=not ok)

    def tool_schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]


ENVIRONMENTS: Registry = Registry("environment")


@ENVIRONMENTS.register("tools")
def _tool_env(tools: list[str] | None = None, tool_options: dict | None = None, error_reward: float = 0.0):
    return ToolEnv(build_tools(list(tools or ["calculator"]), tool_options), error_reward=error_reward)


@ENVIRONMENTS.register("textarena")
def _textarena_env(env_id: str = "GuessTheNumber-v0"):
    from posttrain.data.envs.textarena import TextArenaEnv

    return TextArenaEnv(env_id)


def make_env(name: str, **options) -> Environment:
    """Environment `name` from the registry; unknown names list the valid ones."""
    return ENVIRONMENTS[name](**options)
