"""Tools: Python functions as tool schemas, Hermes/Qwen ``<tool_call>`` parsing, execution with limits.

D0 "Tool-call parsing": one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in an
assistant turn. The parser returns ``(calls, text_without_calls, errors)``; malformed JSON, an unknown tool
name or arguments that do not fit the schema are never executed: each becomes an error line in the
observation the model sees next and is counted (``format_errors``). Calls beyond the per-turn or
per-episode limit are refused the same way. A tool that raises or runs past its timeout gives an error
observation and a counted failure; the episode goes on. Outputs longer than ``max_output_chars`` are cut
with an explicit marker.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TRUNCATION_MARKER = "...[output truncated: {n} more characters]"
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    """One callable tool and its JSON schema (the OpenAI/Hermes function shape)."""

    name: str
    description: str
    parameters: dict[str, Any]  # {"type": "object", "properties": {...}, "required": [...]}
    fn: Callable[..., Any]
    timeout_s: float = 10.0

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a Google-style docstring (``Args:`` section)."""
    doc = inspect.getdoc(fn) or ""
    head, _, rest = doc.partition("\nArgs:")
    args: dict[str, str] = {}
    for line in rest.splitlines():
        match = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", line)
        if match:
            args[match.group(1)] = match.group(2).strip()
        elif line.strip() and not line.startswith(" ") and args:
            break  # the next section (Returns:, ...)
    return " ".join(head.split()), args


def _json_type(annotation: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(annotation) or annotation
    if origin in _JSON_TYPES:
        return {"type": _JSON_TYPES[origin]}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(annotation))}
    raise TypeError(f"{where}: annotation {annotation!r} has no JSON schema type; use int, float, str, bool, "
                    "list, dict or a Literal")


def tool_from_function(fn: Callable, *, name: str | None = None, timeout_s: float = 10.0) -> Tool:
    """A Tool whose schema comes from ``fn``'s signature (annotated parameters; those with defaults are
    optional) and docstring (first paragraph = description, ``Args:`` lines = parameter descriptions)."""
    name = name or fn.__name__
    description, arg_docs = _doc_parts(fn)
    if not description:
        raise ValueError(f"tool {name!r}: the function needs a docstring (it becomes the tool's description)")
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name not in hints:
            raise TypeError(f"tool {name!r}: parameter {p.name!r} needs a type annotation (it becomes the schema)")
        prop = _json_type(hints[p.name], f"tool {name!r} parameter {p.name!r}")
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    return Tool(name, description, {"type": "object", "properties": properties, "required": required}, fn, timeout_s)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str) -> tuple[list[ToolCall], str, list[str]]:
    """(calls, text without the call blocks, errors) of one assistant turn (Hermes/Qwen format).

    An unclosed ``<tool_call>`` or a block whose body is not a JSON object with a string ``name`` and an
    object ``arguments`` is an error, never a silently dropped call."""
    calls, errors = [], []
    for i, match in enumerate(TOOL_CALL.finditer(text), start=1):
        body = match.group(1).strip()
        try:
            value = json.loads(body)
        except json.JSONDecodeError as err:
            errors.append(f"tool call {i} is not valid JSON ({err.msg} at character {err.pos})")
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            errors.append(f'tool call {i} must be a JSON object {{"name": ..., "arguments": {{...}}}}')
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            errors.append(f"tool call {i} ({value['name']}): 'arguments' must be a JSON object")
            continue
        calls.append(ToolCall(value["name"], arguments))
    rest = TOOL_CALL.sub("", text)
    if "<tool_call>" in rest:
        errors.append("a <tool_call> block is not closed with </tool_call>")
    return calls, rest.strip(), errors


def check_arguments(tool: Tool, arguments: dict[str, Any]) -> str | None:
    """Why ``arguments`` do not fit the tool's schema, or None."""
    props, required = tool.parameters.get("properties", {}), tool.parameters.get("required", [])
    missing = [k for k in required if k not in arguments]
    if missing:
        return f"tool {tool.name!r} is missing argument(s) {missing}"
    unknown = [k for k in arguments if k not in props]
    if unknown:
        return f"tool {tool.name!r} has no argument(s) {unknown} (it takes {sorted(props)})"
    for key, value in arguments.items():
        spec = props[key]
        kind = spec.get("type")
        if "enum" in spec and value not in spec["enum"]:
            return f"tool {tool.name!r} argument {key!r} must be one of {spec['enum']}, got {value!r}"
        expected = {v: k for k, v in _JSON_TYPES.items()}.get(kind)
        ok = expected is None or isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            return f"tool {tool.name!r} argument {key!r} must be {kind}, got {type(value).__name__} {value!r}"
    return None


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters plus a marker saying how much was cut."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + TRUNCATION_MARKER.format(n=len(text) - max_chars)


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="policylab-tool")


@dataclass
class ToolBox:
    """The tools of one trajectory, with its call limits and counters."""

    tools: dict[str, Tool]
    max_calls_per_turn: int = 4
    max_calls_per_episode: int = 16
    max_output_chars: int = 1024
    calls: int = 0  # executed calls
    format_errors: int = 0  # unparsable, unknown or ill-typed calls and calls over a limit
    failures: int = 0  # executed calls that raised or timed out
    latency_s: float = 0.0
    log: list[dict] = field(default_factory=list)

    def run_turn(self, text: str) -> tuple[list[str], int, int]:
        """Execute the calls of one assistant turn: (observation lines, executed calls, format errors)."""
        calls, _, errors = parse_tool_calls(text)
        lines = [f"error: {e}" for e in errors]
        executed, rejected = 0, len(errors)
        for i, call in enumerate(calls):
            tool = self.tools.get(call.name)
            problem = None
            if tool is None:
                problem = f"unknown tool {call.name!r} (tools: {sorted(self.tools)})"
            elif i >= self.max_calls_per_turn:
                problem = f"more than {self.max_calls_per_turn} tool calls in one turn; call {call.name!r} not run"
            elif self.calls >= self.max_calls_per_episode:
                problem = f"the episode's limit of {self.max_calls_per_episode} tool calls is reached"
            else:
                problem = check_arguments(tool, call.arguments)
            if problem is not None:
                lines.append(f"error: {problem}")
                rejected += 1
                continue
            lines.append(self._execute(tool, call.arguments))
            executed += 1
        self.format_errors += rejected
        return lines, executed, rejected

    def _execute(self, tool: Tool, arguments: dict[str, Any]) -> str:
        self.calls += 1
        t0 = time.perf_counter()
        future = _POOL.submit(tool.fn, **arguments)
        try:
            out = truncate(str(future.result(timeout=tool.timeout_s)), self.max_output_chars)
            ok = True
        except concurrent.futures.TimeoutError:
            # the thread cannot be killed; it finishes in the background (sandboxed tools bound themselves)
            out, ok = f"error: tool {tool.name!r} timed out after {tool.timeout_s:g} s", False
        except Exception as err:  # a tool bug costs this call, not the run
            out, ok = f"error: tool {tool.name!r} raised {type(err).__name__}: {err}", False
        elapsed = time.perf_counter() - t0
        self.latency_s += elapsed
        self.failures += not ok
        self.log.append({"tool": tool.name, "arguments": arguments, "ok": ok, "seconds": elapsed})
        return out


def tools_prompt(tools: list[Tool]) -> str:
    """The system text that tells the model its tools and the call format (Hermes/Qwen style)."""
    schemas = "\n".join(json.dumps(t.schema()) for t in tools)
    return ("You may call tools. Tools:\n" + schemas + "\nTo call one, write "
            '<tool_call>{"name": <tool name>, "arguments": {<arguments>}}</tool_call> and stop; '
            "the result comes back in the next message. Without a tool call your message is your final answer.")
