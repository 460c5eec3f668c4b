"""Tool-integrated arithmetic (the TIR setting of ASPO/OTC, data_agents_eval.md D2/D3): products and sums of
several-digit numbers that a small model gets wrong by heart and right with the calculator or python tool.

The episode: the model may call tools (``<tool_call>`` blocks, results back as ``tool`` messages); its
first message without a tool call is the final answer, correct iff its last integer equals the exact value
(reward 1, success). Train and held-out rows come from disjoint problem sets of the same generator.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from policylab.environments.builtin_tools import builtin_tools
from policylab.environments.tool_env import ToolEnvironment
from policylab.registry import register

_INT = re.compile(r"-?\d+")


@register("environment", "tool_math", spec="data_agents_eval.md D2 (tool-integrated reasoning), D0 tool calls")
class ToolMath(ToolEnvironment):
    """Arithmetic with a calculator (or python) tool; reward 1 iff the final answer's last integer is exact.

    ``digits``: operand size; ``terms``: operands per problem; ``tools``: built-in tools offered
    (``calculator``, ``python``)."""

    def __init__(self, digits: int = 3, terms: int = 2, operators: str = "*+", tools: list[str] = ("calculator",),
                 tool_choice: Literal["offer", "none"] = "offer", max_calls_per_turn: int = 2,
                 max_calls_per_episode: int = 4, max_output_chars: int = 256,
                 prompt_style: Literal["schema", "brief"] = "schema"):
        if digits < 1 or terms < 2 or not operators or set(operators) - set("+-*"):
            raise ValueError("tool_math needs digits >= 1, terms >= 2 and operators from '+-*'")
        self.digits, self.terms, self.operators = digits, terms, operators
        offered = builtin_tools(list(tools)) if tool_choice == "offer" else []
        super().__init__(offered, max_calls_per_turn=max_calls_per_turn, max_calls_per_episode=max_calls_per_episode,
                         max_output_chars=max_output_chars)
        self.answer: int | None = None
        self.prompt_style = prompt_style

    @property
    def instructions(self) -> str:  # type: ignore[override]
        """The tools' JSON schemas (``schema``), or one example call per tool (``brief``, for small contexts)."""
        if self.prompt_style == "schema" or not self.tool_list:
            return super().instructions
        examples = {"calculator": '{"expression": "2*3"}', "python": '{"code": "print(2*3)"}'}
        return "Tools: " + " ".join(f'<tool_call>{{"name": "{t.name}", "arguments": {examples.get(t.name, "{}")}}}</tool_call>'
                                    for t in self.tool_list)

    def on_reset(self, row: dict, seed: int) -> str:
        if "answer" not in row:
            raise ValueError("tool_math row has no 'answer'")
        self.answer = int(row["answer"])
        return ""

    def score(self, answer: str) -> tuple[float, bool]:
        found = _INT.findall(answer.replace(",", ""))
        correct = bool(found) and int(found[-1]) == self.answer
        return float(correct), correct

    def problem(self, rng: random.Random) -> tuple[str, int]:
        low, high = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits - 1
        expr = str(rng.randint(low, high))
        for _ in range(self.terms - 1):
            expr += f" {rng.choice(self.operators)} {rng.randint(low, high)}"
        return expr, int(eval(expr))  # noqa: S307 - digits and + - * only, built above

    def task_rows(self, split: str, n: int, seed: int) -> list[dict]:
        """Disjoint splits: a problem is in "eval" iff a hash of it is 0 mod 5."""
        rng = random.Random(f"tool_math/{seed}")
        rows, seen = [], set()
        want_eval = split == "eval"
        tries = 0
        while len(rows) < n and tries < 200 * n:
            tries += 1
            expr, value = self.problem(rng)
            if expr in seen or (hash_of(expr) % 5 == 0) != want_eval:
                continue
            seen.add(expr)
            rows.append({"prompt": f"What is {expr}?", "answer": value,
                         "expression": expr})
        if len(rows) < n:
            raise ValueError(f"tool_math: only {len(rows)} distinct {split} problems at digits={self.digits}, "
                             f"terms={self.terms}; ask for fewer rows or more digits")
        return rows


def hash_of(text: str) -> int:
    """A stable (process-independent) hash: Python's hash() of a str changes between runs."""
    value = 0
    for ch in text:
        value = (value * 131 + ord(ch)) % (1 << 31)
    return value
