"""Small helpers shared by the seed advantage estimators: reward access and per-group reductions.

Groups are arbitrary (non-contiguous) prompt ids; every reduction goes through dense ids from
:func:`policylab.algo.group_stats.group_index`. NaN rewards mark failed samples (advantage 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.rollouts import Rollouts


def rewards_of(rollouts: Rollouts, who: str) -> Tensor:
    """rollouts.rewards as float [B], or a clear error naming the component that needed them."""
    if rollouts.rewards is None:
        raise ValueError(f"{who} needs rollouts.rewards; run the reward stage first")
    return rollouts.rewards.float()


def group_sum(values: Tensor, idx: Tensor, k: int) -> Tensor:
    """[K] per-group sums of ``values`` [B] (dense group ids ``idx``), in float64."""
    return torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values.double())


def group_max(values: Tensor, idx: Tensor, k: int, empty: float = float("-inf")) -> Tensor:
    """[K] per-group maxima of ``values`` [B]; groups with no entries get ``empty``."""
    out = torch.full((k,), empty, dtype=torch.float64)
    return out.scatter_reduce(0, idx, values.double(), reduce="amax", include_self=True)


def require_extra(rollouts: Rollouts, key: str, who: str, hint: str) -> Tensor:
    """rollouts.extras[key] or an error saying which component needed it and what fills it."""
    if key not in rollouts.extras:
        raise ValueError(f"{who} needs rollouts.extras[{key!r}] ({hint})")
    return rollouts.extras[key]


def sequence_logp(rollouts: Rollouts) -> Tensor | None:
    """[B,T] log-probs of the policy that produced the batch (old, else behaviour), or None."""
    if rollouts.old_logp is not None:
        return rollouts.old_logp
    return rollouts.behavior_logp


def masked_row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[B] mean of ``values`` over each row's mask; rows without tokens give 0."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
