"""Built-in synthetic arithmetic task: seeded, configurable operands, operators and difficulty."""

from __future__ import annotations

import operator
import random

from policylab.registry import register
from policylab.tasks import Task

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def make_problem(rng: random.Random, operands: int, operators: str, low: int, high: int) -> tuple[str, int]:
    values = [rng.randint(low, high) for _ in range(operands)]
    ops = [rng.choice(operators) for _ in range(operands - 1)]
    expr = str(values[0])
    for op, v in zip(ops, values[1:]):
        expr += f" {op} {v}"
    # evaluate left to right with * binding tighter, exactly as Python reads the expression
    return expr, int(eval(expr, {"__builtins__": {}}))  # expr contains only digits, spaces and + - *


@register("task", "arithmetic", spec="foundation issue §4")
def arithmetic(
    *,
    train_size: int = 2000,
    eval_size: int = 200,
    operands: int = 2,
    operators: str = "+",
    low: int = 10,
    high: int = 99,
    difficulty: int | None = None,
    template: str = "What is {expr}? Give only the final number.",
    system: str | None = None,
    seed: int = 1234,
) -> Task:
    """Problems like "What is 37 + 58? Give only the final number." with answer "95".

    ``difficulty`` (1, 2, 3, ...) overrides low/high with operands of exactly that many digits.
    The eval split never repeats a train expression.
    """
    bad = set(operators) - set(_OPS)
    if bad or not operators:
        raise ValueError(f"arithmetic operators must be drawn from '+-*', got {operators!r}")
    if operands < 2:
        raise ValueError("arithmetic needs operands >= 2")
    if difficulty is not None:
        if difficulty < 1:
            raise ValueError("arithmetic difficulty must be >= 1")
        low, high = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
    if low > high:
        raise ValueError(f"arithmetic low={low} > high={high}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    budget = 50 * (train_size + eval_size) + 1000
    while len(rows) < train_size + eval_size and budget:
        budget -= 1
        expr, value = make_problem(rng, operands, operators, low, high)
        if expr in seen:
            continue
        seen.add(expr)
        row = {"prompt": template.format(expr=expr), "answer": str(value), "expression": expr}
        if system:
            row["system"] = system
        rows.append(row)
    if len(rows) < train_size + eval_size:
        raise ValueError(f"arithmetic: only {len(rows)} distinct problems exist for these settings; lower train_size/eval_size")
    return Task("arithmetic", train=rows[:train_size], eval=rows[train_size:])
