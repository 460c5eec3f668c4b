"""Group filters: which prompt groups of a generation round reach the trainer (data_agents_eval.md A1)."""

from __future__ import annotations

import torch
from torch import Tensor

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


@register("group_filter", "zero_variance", spec="data_agents_eval.md A1 (DAPO dynamic sampling)")
def keep_nonzero_variance(rollouts: Rollouts, *, metric: str = "acc") -> Tensor:
    """Keep a group iff the population std of its metric is > 0, or it has exactly one member.

    Rows whose reward failed (NaN) are left out of the std, as they are left out of the advantage
    baseline: [1, 1, NaN] has zero advantage everywhere and is dropped.
    Returns a bool tensor over dense group ids (order of ``torch.unique(rollouts.group)``).
    """
    values = group_metric(rollouts, metric).double()
    valid = (~torch.isnan(rollouts.rewards) & ~torch.isnan(values)).double()
    values = torch.nan_to_num(values, nan=0.0)
    idx, k = group_index(rollouts.group)
    members = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, torch.ones_like(values))
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, valid).clamp(min=1)
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values * valid) / count
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, valid * (values - mean[idx]) ** 2) / count
    return (var > 1e-12) | (members == 1)
