"""Tool environments: a turn with ``<tool_call>`` blocks runs them and the results come back as a ``tool``
message; a turn without one is the final answer, scored by the environment, which ends the episode.

Two user-facing forms besides subclassing:

* the plain-Python form TRL users know from ``environment_factory``: a class with ``reset(**row)`` (optional;
  it may return text for the first message), public methods = tools (signature and docstring become the
  schema), and optionally ``reward(answer) -> float`` and ``success(answer) -> bool`` for the final answer.
  :class:`ObjectEnvironment` wraps one; a recipe names it by import path (``environment: my_env.py:MyEnv``).
* Python functions as tools: ``ToolEnvironment(tools=[tool_from_function(f), ...])``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from policylab.environments.base import Environment
from policylab.environments.tools import Tool, ToolBox, tool_from_function, tools_prompt


class ToolEnvironment(Environment):
    """Base of tool-using environments; subclasses implement ``score(answer) -> (reward, success)``."""

    reward_mode = "incremental"

    def __init__(self, tools: list[Tool] | None = None, *, max_calls_per_turn: int = 4,
                 max_calls_per_episode: int = 16, max_output_chars: int = 1024):
        super().__init__()
        self.tool_list = list(tools or [])
        self.limits = dict(max_calls_per_turn=max_calls_per_turn, max_calls_per_episode=max_calls_per_episode,
                           max_output_chars=max_output_chars)
        self.box = ToolBox({t.name: t for t in self.tool_list}, **self.limits)
        self.answered = False
        self.won = False

    @property
    def instructions(self) -> str:  # type: ignore[override]
        return tools_prompt(self.tool_list) if self.tool_list else ""

    def _reset(self, row: dict, seed: int) -> str:
        self.box = ToolBox({t.name: t for t in self.tool_list}, **self.limits)
        self.answered = self.won = False
        return self.on_reset(row, seed)

    def on_reset(self, row: dict, seed: int) -> str:
        return ""

    def _step(self, action: str):
        if "<tool_call>" in action:
            lines, executed, rejected = self.box.run_turn(action)
            info = {"role": "tool", "tool_calls": executed, "format_errors": rejected}
            return "\n".join(lines), False, 0.0, info
        self.answered = True
        reward, self.won = self.score(action)
        return "", True, float(reward), {"tool_calls": 0, "format_errors": 0}

    def score(self, answer: str) -> tuple[float, bool]:
        raise NotImplementedError

    def success(self) -> bool:
        return self.won


class ObjectEnvironment(ToolEnvironment):
    """A plain Python object as a tool environment: its public methods (but ``reset``, ``reward``,
    ``success``) are the tools."""

    RESERVED = ("reset", "reward", "success")

    def __init__(self, factory: Callable[[], Any], **limits):
        self.factory = factory
        probe = factory()
        super().__init__(self._tools_of(probe), **limits)
        self.obj = probe

    def _tools_of(self, obj) -> list[Tool]:
        tools = []
        for name, member in inspect.getmembers(obj, predicate=inspect.ismethod):
            if name.startswith("_") or name in self.RESERVED:
                continue
            tools.append(tool_from_function(member, name=name))
        if not tools:
            raise ValueError(f"environment class {type(obj).__name__} has no public methods to use as tools")
        return tools

    def on_reset(self, row: dict, seed: int) -> str:
        self.obj = self.factory()
        self.box.tools = {t.name: t for t in self._tools_of(self.obj)}  # bound to the fresh object
        reset = getattr(self.obj, "reset", None)
        if reset is None:
            return ""
        accepted = inspect.signature(reset).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
        kwargs = {k: v for k, v in row.items() if takes_all or k in accepted}
        out = reset(**kwargs)
        return "" if out is None else str(out)

    def score(self, answer: str) -> tuple[float, bool]:
        reward = getattr(self.obj, "reward", None)
        value = float(reward(answer)) if reward is not None else 0.0
        success = getattr(self.obj, "success", None)
        return value, bool(success(answer)) if success is not None else value >= 1.0
