"""Built-in tools: a calculator (exact arithmetic on a parsed expression) and a Python interpreter that runs
in the rewards' code sandbox (rewards/code_sandbox: a fresh confined interpreter per call, wall clock and
memory limits; only its public ``run_python`` API is used here)."""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

from policylab.environments.tools import Tool, tool_from_function

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(node.value) if isinstance(node.value, int) else Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (right.denominator != 1 or abs(right) > 64 or abs(left) > 10**6):
            raise ValueError("powers need a small integer exponent")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ZeroDivisionError("division by zero")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).

    Args:
        expression: the expression, e.g. "(12 + 7) * 3"
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = _evaluate(ast.parse(expression, mode="eval"))
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


def python_tool(timeout_s: float = 5.0, memory_mb: int = 512) -> Tool:
    """The ``python`` tool: runs code in the code sandbox and returns its stdout (and the last stderr line
    on a failure)."""
    from policylab.rewards.code_sandbox import SandboxLimits, run_python

    limits = SandboxLimits(wall_s=timeout_s, memory_mb=memory_mb)

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it prints (use print to see a value).

        Args:
            code: the program
        """
        run = run_python({"mode": "io", "solution": code, "tests": [], "step_timeout_s": timeout_s}, stdin=b"",
                         limits=limits)
        if run.failure:
            return f"error: {run.failure}"
        out = run.stdout.decode("utf-8", "replace")
        if run.returncode != 0:
            tail = run.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            return (out + f"error: exit status {run.returncode} {tail[0]}").strip()
        return out.rstrip("\n") if out.strip() else "(no output; print the value to see it)"

    # the sandbox bounds the run itself; the tool's timeout leaves it time to start and report
    return tool_from_function(python, timeout_s=timeout_s + 30.0)


def builtin_tools(names: tuple[str, ...] | list[str], python_timeout_s: float = 5.0) -> list[Tool]:
    makers = {"calculator": lambda: tool_from_function(calculator), "python": lambda: python_tool(python_timeout_s)}
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown built-in tool(s) {unknown}; built-in tools: {sorted(makers)}")
    return [makers[n]() for n in names]
