"""Rewards for the built-in arithmetic task: numeric answer match and answer format."""

from __future__ import annotations

import re

from policylab.registry import register

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last integer or decimal in ``text`` (thousands separators removed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


@register("reward", "numeric_answer", spec="foundation issue §6")
def numeric_answer(prompt: str, completion: str, row: dict, *, tolerance: float = 1e-6) -> float:
    """1.0 if the last number in the completion equals row['answer'] (within tolerance), else 0.0."""
    if "answer" not in row:
        raise KeyError("numeric_answer needs an 'answer' column in the task row")
    got = last_number(completion)
    if got is None:
        return 0.0
    try:
        return 1.0 if abs(float(got) - float(str(row["answer"]).replace(",", ""))) <= tolerance else 0.0
    except ValueError as err:  # a non-numeric gold answer is bad data, not a wrong completion
        raise ValueError(f"numeric_answer: gold answer {row['answer']!r} is not a number") from err


@register("reward", "format", spec="foundation issue §6")
def answer_format(prompt: str, completion: str, row: dict, *, pattern: str = r"^\s*-?\d+\s*$") -> float:
    """1.0 if the whole completion matches ``pattern`` (default: only a number), else 0.0."""
    return 1.0 if re.search(pattern, completion.strip()) else 0.0
