"""Weighted combination of named reward functions; a failing function never crashes training.

A reward that raises or returns None (or NaN) marks that sample's total reward NaN: the advantage
stage leaves it out of its group's baseline and gives it a zero advantage; it is counted in
``reward/failed``. ``accuracy`` is the first reward component read as correct (> 0.5). A reward with ``batched = True``
(rewards/user.py: TRL-style functions) is called once per batch through ``score_batch``; one with
``reads_rollouts = True`` (rewards/environment.py: an agent episode's return) once per batch through
``score_rollouts(rollouts)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from policylab import registry


@dataclass
class NamedReward:
    name: str
    weight: float
    fn: Callable[..., float | None]


class RewardCombiner:
    def __init__(self, specs):
        self.rewards: list[NamedReward] = []
        for i, spec in enumerate(specs):
            params = dict(spec.params)
            weight = float(params.pop("weight", 1.0))
            fn = registry.build("reward", spec.name, params, where=f"rewards.{i}")
            # a user function logs under its own name (reward/score), not the component's ("python")
            self.rewards.append(NamedReward(getattr(fn, "reward_name", spec.name), weight, fn))
        self.failures_logged = 0

    def score_one(self, reward: NamedReward, prompt: str, completion: str, row: dict) -> float:
        try:
            value = reward.fn(prompt, completion, row)
        except Exception as err:  # a reward bug must cost one sample, not the run
            if self.failures_logged < 5:
                warnings.warn(f"reward {reward.name!r} raised {type(err).__name__}: {err}", stacklevel=2)
                self.failures_logged += 1
            return math.nan
        if value is None:
            return math.nan
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    def score_batch(self, reward: NamedReward, prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        """A batched reward (``score_batch``, e.g. a TRL-style user function): one call; a raise fails the batch."""
        try:
            return reward.fn.score_batch(prompts, completions, rows)
        except Exception as err:  # as in score_one: the batch's samples fail, the run goes on
            if self.failures_logged < 5:
                warnings.warn(f"reward {reward.name!r} raised {type(err).__name__}: {err}", stacklevel=2)
                self.failures_logged += 1
            return [math.nan] * len(completions)

    def score_rollouts(self, reward: NamedReward, rollouts) -> list[float]:
        """A rollout-level reward (``score_rollouts``): one call on the batch; a raise fails the batch."""
        if rollouts is None:
            raise ValueError(f"reward {reward.name!r} reads the rollout batch (an agent engine's fields); this caller "
                             "passed texts only")
        try:
            return reward.fn.score_rollouts(rollouts)
        except Exception as err:
            if self.failures_logged < 5:
                warnings.warn(f"reward {reward.name!r} raised {type(err).__name__}: {err}", stacklevel=2)
                self.failures_logged += 1
            return [math.nan] * rollouts.batch_size

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict],
                 rollouts=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for reward in self.rewards:
            if getattr(reward.fn, "reads_rollouts", False):
                scores = self.score_rollouts(reward, rollouts)
            elif getattr(reward.fn, "batched", False):
                scores = self.score_batch(reward, prompts, completions, rows)
            else:
                scores = [self.score_one(reward, p, c, r) for p, c, r in zip(prompts, completions, rows)]
            values = torch.tensor(scores, dtype=torch.float32)
            key = reward.name if reward.name not in components else f"{reward.name}_{len(components)}"
            components[key] = values
            total = total + reward.weight * values  # NaN propagates: any failed component fails the sample
        first = next(iter(components.values()))
        components["accuracy"] = torch.where(torch.isnan(first), first, (first > 0.5).float())
        return total, components
