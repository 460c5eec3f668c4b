"""ReMax's greedy-response baseline: one greedy generation per prompt, scored with the run's reward.

The advantage ``remax`` lives here because its ``annotate`` pass drives the model (``ctx.generate``); the
subtraction itself is :func:`policylab.algo.advantages.group_baselines.remax_advantage`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.group_baselines import remax_advantage
from policylab.algo.advantages.reductions import first_row_of_each_group, rewards_of
from policylab.algo.group_stats import nan_to_zero
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

REMAX_BASELINE = declare_field("remax_baseline", per_row=True, shape="[B]", dtype="float", owner="advantage 'remax'",
                               doc="reward of the greedy completion of the row's prompt (NaN = its reward failed)")


@register("advantage", "remax", spec="arXiv:2310.10505 (greedy-response baseline)", tags=("skip:A-SHIFT",))
class ReMaxAdvantage:
    """ReMax (arXiv:2310.10505): A_i = r_i - b_i, where the baseline b_i is the reward of the greedy
    completion of prompt i; no normalisation.

    ``annotate`` generates one greedy completion per prompt with ``ctx.generate(rows, temperature=0,
    group_size=1)`` and scores it with the run's reward ``ctx.reward(prompts, completions, rows)`` (unless the
    greedy Rollouts already carry rewards); it provides ``remax_baseline`` [B]. Reward shaping is not applied
    to the baseline and the greedy tokens are never trained. A failed greedy reward (NaN) gives the whole
    group advantage 0. The baseline is a separately scored reward, not a statistic of the batch's rewards, so
    offsetting the batch's rewards alone moves the advantage (tagged skip:A-SHIFT).
    """

    requires = ("rewards", "rows", REMAX_BASELINE.name)  # its own annotate pass provides the baseline
    provides = (REMAX_BASELINE,)

    def __init__(self):
        self.last_metrics: dict[str, float] = {}

    def annotate(self, rollouts: Rollouts, ctx) -> dict[str, Tensor]:
        idx, first = first_row_of_each_group(rollouts.group)
        if len(rollouts.rows) != rollouts.batch_size:
            raise ValueError("remax needs rollouts.rows (the task row of every completion) to generate greedy baselines")
        rows = [rollouts.rows[i] for i in first.tolist()]
        greedy = ctx.generate(rows, temperature=0.0, group_size=1)
        if greedy.batch_size != len(rows):
            raise ValueError(f"remax: ctx.generate returned {greedy.batch_size} completions for {len(rows)} prompts")
        if greedy.rewards is not None:
            baseline = greedy.rewards.float()
        else:
            prompts = greedy.prompts or [row.get("prompt", "") for row in rows]
            baseline, _ = ctx.reward(prompts, greedy.completions, rows)
            baseline = torch.as_tensor(baseline, dtype=torch.float32)
        return {REMAX_BASELINE.name: baseline.cpu()[idx]}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "remax")
        if REMAX_BASELINE.name not in rollouts.extras:
            raise ValueError("remax needs rollouts.extras['remax_baseline'], which its annotate pass provides")
        b = rollouts.extras[REMAX_BASELINE.name].float()
        adv = remax_advantage(r, b)
        valid = ~torch.isnan(r) & ~torch.isnan(b)
        self.last_metrics = {
            "remax/baseline_mean": float(nan_to_zero(b).mean()) if b.numel() else 0.0,
            "remax/frac_beats_greedy": float((adv > 0)[valid].float().mean()) if valid.any() else 0.0,
        }
        return adv
