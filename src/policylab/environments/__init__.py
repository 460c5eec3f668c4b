"""Multi-turn environments (data_agents_eval.md D0): the contract (base.py), tools (tools.py, builtin_tools.py,
tool_env.py), the built-in environments (tool_math.py, text_game.py, textworld_games.py) and the
``environment`` task (tasks.py). The agent rollout engine that runs them is rollout/agent.py."""

from policylab.environments.base import Environment, EnvironmentContractError, increments
from policylab.environments.tool_env import ObjectEnvironment, ToolEnvironment
from policylab.environments.tools import Tool, ToolBox, parse_tool_calls, tool_from_function

__all__ = ["Environment", "EnvironmentContractError", "ObjectEnvironment", "Tool", "ToolBox", "ToolEnvironment",
           "increments", "parse_tool_calls", "tool_from_function"]
