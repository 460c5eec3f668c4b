"""Small reductions shared by the advantage estimators: reward access, per-group sums and maxima, row means.

Groups are arbitrary (non-contiguous) prompt ids; every reduction goes through dense ids from
:func:`policylab.algo.group_stats.group_index`. NaN rewards mark failed samples (advantage 0).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from policylab.algo import group_stats
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.rollouts import Rollouts


def rewards_of(rollouts: Rollouts, who: str) -> Tensor:
    """rollouts.rewards as float [B], or a clear error naming the component that needed them."""
    if rollouts.rewards is None:
        raise ValueError(f"{who} needs rollouts.rewards; run the reward stage first")
    return rollouts.rewards.float()


# the estimators' statistics are accumulated in float64
group_sum = functools.partial(group_stats.group_sum, dtype=torch.float64)


def group_max(values: Tensor, idx: Tensor, k: int, empty: float = float("-inf")) -> Tensor:
    """[K] per-group maxima of ``values`` [B]; groups with no entries get ``empty``."""
    out = torch.full((k,), empty, dtype=torch.float64)
    return out.scatter_reduce(0, idx, values.double(), reduce="amax", include_self=True)


def group_means(values: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean per row [B], valid count per row [B], dense ids [B]) over non-NaN values; a singleton's mean is its
    value (unlike :func:`policylab.algo.group_stats.group_mean_std`, whose singletons get mean 0)."""
    idx, k = group_index(group)
    valid = ~torch.isnan(values)
    count = group_sum(valid.double(), idx, k)
    mean = group_sum(nan_to_zero(values), idx, k) / count.clamp(min=1)
    return mean[idx], count[idx], idx


def first_row_of_each_group(group: Tensor) -> tuple[Tensor, Tensor]:
    """(dense group id per row [B], batch index of each group's first row [K])."""
    idx, k = group_index(group)
    positions = torch.arange(group.numel())
    first = torch.full((k,), group.numel(), dtype=torch.long).scatter_reduce(0, idx, positions, reduce="amin")
    return idx, first


def sequence_logp(rollouts: Rollouts) -> Tensor:
    """[B,T] log-probs of the policy that produced the batch: ``old_logp`` when the loop froze it, else the
    engine's ``behavior_logp`` (every engine records it)."""
    logp = rollouts.old_logp if rollouts.old_logp is not None else rollouts.behavior_logp
    if logp is None:
        raise ValueError("this advantage needs the sampling policy's log-probs (rollouts.behavior_logp or old_logp)")
    return logp.float()


def masked_row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[B] mean of ``values`` over each row's mask; rows without tokens give 0."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
