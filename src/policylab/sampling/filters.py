"""Group filters: which prompt groups of a generation round reach the trainer (DAPO dynamic sampling)."""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import group_sum
from policylab.algo.group_stats import group_index
from policylab.registry import register
from policylab.rollouts import Rollouts


def group_metric(rollouts: Rollouts, metric: str) -> Tensor:
    if metric == "acc":
        if "accuracy" in rollouts.reward_components:
            return rollouts.reward_components["accuracy"].float()
        return (torch.nan_to_num(rollouts.rewards, nan=0.0) > 0).float()
    if metric in ("score", "seq_reward"):
        return torch.nan_to_num(rollouts.rewards.float(), nan=0.0)
    raise ValueError(f"group filter metric must be 'acc' or 'score', got {metric!r}")


@register("group_filter", "zero_variance", spec="arXiv:2503.14476 §3.2 (DAPO dynamic sampling)",
          requires=("rewards", "reward_components"))
def keep_nonzero_variance(rollouts: Rollouts, *, metric: str = "acc") -> Tensor:
    """DAPO dynamic sampling (arXiv:2503.14476 §3.2): keep a group iff the population std of its metric
    (accuracy or score) is > 0, i.e. its rewards are not all equal, or it has exactly one member.

    Rows whose reward failed (NaN) are left out of the std, as they are left out of the advantage
    baseline: [1, 1, NaN] has zero advantage everywhere and is dropped.
    Returns a bool tensor over dense group ids (order of ``torch.unique(rollouts.group)``).
    """
    values = group_metric(rollouts, metric).double()
    valid = (~torch.isnan(rollouts.rewards) & ~torch.isnan(values)).double()
    values = torch.nan_to_num(values, nan=0.0)
    idx, k = group_index(rollouts.group)
    members = group_sum(torch.ones_like(values), idx, k)
    count = group_sum(valid, idx, k).clamp(min=1)
    mean = group_sum(values * valid, idx, k) / count
    var = group_sum(valid * (values - mean[idx]) ** 2, idx, k) / count
    return (var > 1e-12) | (members == 1)
