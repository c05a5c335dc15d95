"""Environments and tools for multi-turn rollouts (docs/tools.md)."""

from posttrain.data.envs.base import ENVIRONMENTS, Environment, EnvStep, ToolEnv, make_env
from posttrain.data.envs.tools import TOOLS, Tool, ToolError, build_tools, calculate, parse_tool_call

__all__ = [
    "ENVIRONMENTS",
    "TOOLS",
    "EnvStep",
    "Environment",
    "Tool",
    "ToolEnv",
    "ToolError",
    "build_tools",
    "calculate",
    "make_env",
    "parse_tool_call",
]
