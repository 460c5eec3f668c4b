"""Multi-reward advantages that normalise each reward on its own before combining: GDPO.

The per-reward scores reach the advantage stage as ``rollouts.reward_components`` (name -> [B], UNWEIGHTED, one per
entry of the recipe's ``rewards:``; policylab/rewards/combine.py), beside the weighted total ``rollouts.rewards``.
The combiner also adds ``accuracy``, the first reward read as correct; it duplicates that reward, so it is left out
unless named. The recipe's reward weights are not on the batch: GDPO takes its own ``weights``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import rewards_of
from policylab.algo.group_stats import group_mean_std, nan_to_zero, zero_failed
from policylab.registry import register
from policylab.rollouts import Rollouts

DERIVED_COMPONENTS = ("accuracy",)  # written by the combiner from the first reward, not a reward of its own


def reward_names(rollouts: Rollouts, names: list[str] | None, who: str) -> list[str]:
    """The components to normalise: ``names`` (each must exist), else every component but the derived ones."""
    have = list(rollouts.reward_components)
    if names:
        missing = [n for n in names if n not in rollouts.reward_components]
        if missing:
            raise KeyError(f"{who}: reward component(s) {missing} not in rollouts.reward_components (have {sorted(have)})")
        return list(names)
    chosen = [n for n in have if n not in DERIVED_COMPONENTS] or have
    if not chosen:
        raise ValueError(f"{who} needs rollouts.reward_components (the per-reward scores); run the reward stage first")
    return chosen


@register("advantage", "gdpo", spec="arXiv:2601.05242 §3 (GDPO; TRL multi_objective_aggregation='normalize_then_sum', "
          "verl adv_estimator='gdpo')", requires=("rewards",))
@torch.no_grad()
def gdpo_advantage(rollouts: Rollouts, *, rewards: list[str] | None = None, weights: dict[str, float] | None = None,
                   eps: float = 1e-6) -> Tensor:
    """GDPO (Group reward-Decoupled Normalization Policy Optimization, arXiv:2601.05242 §3): normalise each reward
    within its group first, A_n = (r_n - mean_g r_n) / (std_g r_n + eps), sum them with the reward weights,
    A = sum_n w_n A_n, then normalise the sum over the whole batch, (A - mean_B A) / (std_B A + eps). Summing the
    rewards first (GRPO) lets distinct reward combinations collapse to the same advantage; GDPO keeps them apart.

    ``rewards``: the component names (default: all but the derived ``accuracy``); ``weights``: name -> w_n
    (default 1; names must be among ``rewards``). With one reward it is GRPO followed by batch whitening. Failed
    rows (NaN total) get 0 and stay out of the batch statistics. Stds are unbiased (TRL's torch.std).
    """
    rewards_of(rollouts, "gdpo")
    names = reward_names(rollouts, rewards, "gdpo")
    weights = dict(weights or {})
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise KeyError(f"gdpo: weights for {unknown} name no reward being normalised ({names})")
    total = torch.zeros(rollouts.batch_size, dtype=torch.float64)
    for name in names:
        r = rollouts.reward_components[name].double()
        mean, std, _ = group_mean_std(r, rollouts.group)
        total = total + float(weights.get(name, 1.0)) * nan_to_zero((r - mean) / (std + eps))
    valid = ~torch.isnan(rollouts.rewards.float())
    values = total[valid]
    if values.numel() >= 2:
        total = (total - values.mean()) / (values.std() + eps)
    elif values.numel() == 1:
        total = total - values.mean()
    return zero_failed(total.float(), rollouts)
