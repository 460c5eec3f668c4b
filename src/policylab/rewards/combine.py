"""Weighted combination of named reward functions; a failing function never crashes training.

A reward that raises, returns None, returns a non-finite value (NaN, ±inf, or a number beyond float32 such as
1e39, which would become inf) or runs past ``train.reward_timeout_s`` (rewards/timeout.py) marks that sample's
total reward NaN: the advantage stage leaves it out of its group's baseline and gives it a zero advantage; it is
counted in ``reward/failed`` (and in ``reward/timeouts`` or ``reward/nonfinite``). A weighted total that
overflows float32 fails the sample the same way. ``accuracy`` is the first reward component read as correct
(> 0.5). A reward with ``batched = True`` (rewards/user.py: TRL-style functions) is called once per batch
through ``score_batch``; one with ``reads_rollouts = True`` (rewards/environment.py: an agent episode's
return) once per batch through ``score_rollouts(rollouts)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from policylab import registry
from policylab.rewards.timeout import RewardTimedOut, call_with_timeout

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class NamedReward:
    name: str
    weight: float
    fn: Callable[..., float | None]


class RewardCombiner:
    def __init__(self, specs, timeout_s: float = 0.0):
        self.timeout_s = float(timeout_s)  # per call (a batched reward: per batch); 0 = no deadline
        self.counts = {"reward/timeouts": 0.0, "reward/nonfinite": 0.0}  # of the last __call__
        self.rewards: list[NamedReward] = []
        for i, spec in enumerate(specs):
            params = dict(spec.params)
            weight = float(params.pop("weight", 1.0))
            fn = registry.build("reward", spec.name, params, where=f"rewards.{i}")
            # a user function logs under its own name (reward/score), not the component's ("python")
            self.rewards.append(NamedReward(getattr(fn, "reward_name", spec.name), weight, fn))
        self.failures_logged = 0

    def _warn(self, message: str) -> None:
        if self.failures_logged < 5:
            warnings.warn(message, stacklevel=3)
            self.failures_logged += 1

    def _call(self, reward: NamedReward, fn, args: tuple):
        """``fn(*args)`` under the deadline; (value, failed)."""
        try:
            return call_with_timeout(fn, args, self.timeout_s, reward.name), False
        except RewardTimedOut as err:
            self.counts["reward/timeouts"] += 1
            self._warn(f"{err}; counted as failed")
        except Exception as err:  # a reward bug must cost one sample, not the run
            self._warn(f"reward {reward.name!r} raised {type(err).__name__}: {err}")
        return None, True

    def _number(self, reward: NamedReward, value) -> float:
        if value is None:
            return math.nan
        try:
            number = float(value)
        except (TypeError, ValueError):
            return math.nan
        except OverflowError:  # an int beyond float64 (10**400)
            number = math.inf
        if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):  # 1e39 would be inf as float32
            if not math.isnan(number):
                self.counts["reward/nonfinite"] += 1
                self._warn(f"reward {reward.name!r} returned {number!r}, not a finite float32; counted as failed")
            return math.nan
        return number

    def score_one(self, reward: NamedReward, prompt: str, completion: str, row: dict) -> float:
        value, failed = self._call(reward, reward.fn, (prompt, completion, row))
        return math.nan if failed else self._number(reward, value)

    def score_batch(self, reward: NamedReward, prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        """A batched reward (``score_batch``, e.g. a TRL-style user function): one call; a raise fails the batch."""
        values, failed = self._call(reward, reward.fn.score_batch, (prompts, completions, rows))
        if failed:
            return [math.nan] * len(completions)
        return [self._number(reward, v) for v in values]

    def score_rollouts(self, reward: NamedReward, rollouts) -> list[float]:
        """A rollout-level reward (``score_rollouts``): one call on the batch; a raise fails the batch."""
        if rollouts is None:
            raise ValueError(f"reward {reward.name!r} reads the rollout batch (an agent engine's fields); this caller "
                             "passed texts only")
        values, failed = self._call(reward, reward.fn.score_rollouts, (rollouts,))
        if failed:
            return [math.nan] * rollouts.batch_size
        return [self._number(reward, v) for v in values]

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict],
                 rollouts=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(self.counts, 0.0)
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
        # finite components can still sum past float32 (1e38 * weight 10): that sample fails too
        total = torch.where(torch.isfinite(total), total, torch.full_like(total, math.nan))
        first = next(iter(components.values()))
        components["accuracy"] = torch.where(torch.isnan(first), first, (first > 0.5).float())
        return total, components

    def last_metrics(self) -> dict[str, float]:
        """Timed-out and non-finite reward calls of the last batch scored (in ``reward/failed`` too)."""
        return dict(self.counts)
