"""Per-group statistics over arbitrary (non-contiguous) group ids, ignoring NaN rewards.

A NaN reward marks a failed reward function: it is excluded from its group's mean and std
(foundation issue, "Bad input"), and the caller gives that row a zero advantage.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_index(group: Tensor) -> tuple[Tensor, int]:
    """Dense 0..K-1 ids for the groups present, and K."""
    _, inverse = torch.unique(group, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_mean_std(values: Tensor, group: Tensor, *, unbiased: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (mean, std, count) of the row's group over non-NaN values.

    Singletons (count 1) get mean 0 and std 1 (verl convention, advantages_rewards.md §0);
    empty groups (all NaN) get mean 0, std 1, count 0. Std is Bessel-corrected unless ``unbiased=False``.
    """
    idx, k = group_index(group)
    valid = ~torch.isnan(values)
    v = torch.where(valid, values, torch.zeros_like(values)).double()
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, valid.double())
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, v)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, torch.where(valid, (v - mean[idx]) ** 2, torch.zeros_like(v)))
    dof = (count - 1) if unbiased else count
    std = (sq / dof.clamp(min=1)).sqrt()
    singleton = count <= 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    dt = values.dtype
    return mean[idx].to(dt), std[idx].to(dt), count[idx].to(dt)


def nan_to_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)
