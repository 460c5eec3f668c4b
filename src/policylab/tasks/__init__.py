"""Tasks: a train split and a held-out eval split of rows ``{prompt, answer, [system], ...extras}``.

A task is built by a registered factory (kind "task"); extra row columns travel to the rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    name: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] = field(default_factory=list)
    default_rewards: tuple[str, ...] = ("numeric_answer",)

    def __post_init__(self):
        if not self.train:
            raise ValueError(f"task {self.name!r} has an empty training split")
        for split_name, rows in (("train", self.train), ("eval", self.eval)):
            for i, row in enumerate(rows):
                if "prompt" not in row:
                    raise ValueError(f"task {self.name!r} {split_name} row {i} has no 'prompt'")
