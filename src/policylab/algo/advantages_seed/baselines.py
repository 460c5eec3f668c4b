"""ReMax's greedy-response baseline (A7).

HAPO's token-level group average (A9) is the advantage "hapo" in policylab.algo.objectives_ratio.elastic,
next to the HAPO objective; it is tested against the A9 numbers in tests/test_advantages_seed_gae_baselines.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages_seed.common import require_extra, rewards_of
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts

REMAX_BASELINE = "remax/baseline"


def remax_advantage(rewards: Tensor, baseline: Tensor) -> Tensor:
    """A_i = r_i - b_i (A7, outcome rewards: the same value on every valid token); NaN on either side -> 0."""
    return nan_to_zero(rewards - baseline)


def first_row_of_each_group(group: Tensor) -> tuple[Tensor, Tensor]:
    """(dense group id per row [B], batch index of each group's first row [K])."""
    idx, k = group_index(group)
    positions = torch.arange(group.numel())
    first = torch.full((k,), group.numel(), dtype=torch.long).scatter_reduce(0, idx, positions, reduce="amin")
    return idx, first


def run_reward(ctx):
    """The run's reward function (prompts, completions, rows) -> (total, components), or None."""
    reward_fn = getattr(ctx, "reward", None) or (getattr(ctx, "extras", None) or {}).get("reward")
    if reward_fn is None and getattr(getattr(ctx, "config", None), "rewards", None):
        from policylab.rewards.combine import RewardCombiner  # only the loop's context reaches this

        reward_fn = RewardCombiner(ctx.config.rewards)
    return reward_fn


@register("advantage", "remax", spec="advantages_rewards.md A7")
class ReMaxAdvantage:
    """ReMax (A7): A_i = r_i - b_i, b_i = reward of the greedy completion of prompt i; no normalisation.

    ``prepare`` generates one greedy completion per prompt with ``ctx.generate(rows, temperature=0,
    group_size=1)`` (the loop's generate takes task rows) and scores it with the run's reward,
    ``ctx.reward(prompts, completions, rows) -> (total [K], components)`` (also looked up as
    ``ctx.extras["reward"]``, else rebuilt from the recipe's ``rewards`` in ``ctx.config``), unless the greedy
    Rollouts already carry rewards. Reward shaping is not applied to the baseline. The greedy tokens
    are never trained. A failed greedy reward (NaN) gives the whole group advantage 0.
    """

    def __init__(self):
        self.last_metrics: dict[str, float] = {}
        self._reward = None  # the run's reward function, found once

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        idx, first = first_row_of_each_group(rollouts.group)
        if len(rollouts.rows) != rollouts.batch_size:
            raise ValueError("remax needs rollouts.rows (the task row of every completion) to generate greedy baselines")
        if getattr(ctx, "generate", None) is None:
            raise ValueError("remax needs ctx.generate(rows, temperature=0, group_size=1) for its greedy baseline")
        self._reward = self._reward or run_reward(ctx)
        reward_fn = self._reward
        rows = [rollouts.rows[i] for i in first.tolist()]
        greedy = ctx.generate(rows, temperature=0.0, group_size=1)
        if greedy.batch_size != len(rows):
            raise ValueError(f"remax: ctx.generate returned {greedy.batch_size} completions for {len(rows)} prompts")
        if greedy.rewards is not None:
            baseline = greedy.rewards.float()
        elif reward_fn is None:
            raise ValueError("remax needs ctx.reward(prompts, completions, rows) -> (total, components), the run's "
                             "reward combiner, to score the greedy completions")
        else:
            prompts = greedy.prompts or [row.get("prompt", "") for row in rows]
            baseline, _ = reward_fn(prompts, greedy.completions, rows)
            baseline = torch.as_tensor(baseline, dtype=torch.float32)
        extras = dict(rollouts.extras)
        extras[REMAX_BASELINE] = baseline[idx]
        return rollouts.with_(extras=extras)

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "remax")
        b = require_extra(rollouts, REMAX_BASELINE, "remax", "written by its prepare hook; the loop must call prepare").float()
        adv = remax_advantage(r, b)
        valid = ~torch.isnan(r) & ~torch.isnan(b)
        self.last_metrics = {
            "remax/baseline_mean": float(nan_to_zero(b).mean()) if b.numel() else 0.0,
            "remax/frac_beats_greedy": float((adv > 0)[valid].float().mean()) if valid.any() else 0.0,
        }
        return adv
