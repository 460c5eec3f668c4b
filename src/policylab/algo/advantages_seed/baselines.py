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


@register("advantage", "remax", spec="advantages_rewards.md A7")
class ReMaxAdvantage:
    """ReMax (A7): A_i = r_i - b_i, b_i = reward of the greedy completion of prompt i; no normalisation.

    ``prepare`` generates one greedy completion per prompt with ``ctx.generate(prompts, temperature=0,
    group_size=1)`` and scores it with the run's reward, ``ctx.reward(prompts, completions, rows) ->
    (total [K], components)`` (unless the greedy Rollouts already carry rewards). The greedy tokens are
    never trained. A failed greedy reward (NaN) gives the whole group advantage 0.
    """

    def __init__(self):
        self.last_metrics: dict[str, float] = {}

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        idx, first = first_row_of_each_group(rollouts.group)
        if len(rollouts.prompts) != rollouts.batch_size:
            raise ValueError("remax needs rollouts.prompts (the prompt text of every row) to generate greedy baselines")
        if getattr(ctx, "generate", None) is None:
            raise ValueError("remax needs ctx.generate(prompts, temperature=0, group_size=1) for its greedy baseline")
        prompts = [rollouts.prompts[i] for i in first.tolist()]
        rows = [rollouts.rows[i] if rollouts.rows else {} for i in first.tolist()]
        greedy = ctx.generate(prompts, temperature=0.0, group_size=1)
        if greedy.batch_size != len(prompts):
            raise ValueError(f"remax: ctx.generate returned {greedy.batch_size} completions for {len(prompts)} prompts")
        if greedy.rewards is not None:
            baseline = greedy.rewards.float()
        else:
            reward_fn = getattr(ctx, "reward", None) or ctx.extras.get("reward")
            if reward_fn is None:
                raise ValueError("remax needs ctx.reward(prompts, completions, rows) -> (total, components) to score the greedy completions")
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
