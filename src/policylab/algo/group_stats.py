"""Per-group statistics over arbitrary (non-contiguous) group ids, ignoring NaN rewards.

A NaN reward marks a failed reward function: it is excluded from its group's mean and std
(foundation issue, "Bad input"), and the caller gives that row a zero advantage (:func:`zero_failed`).
:func:`correctness` is the one definition of a correct rollout that the families share.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_index(group: Tensor) -> tuple[Tensor, int]:
    """Dense 0..K-1 ids for the groups present, and K."""
    _, inverse = torch.unique(group, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_sum(values: Tensor, idx: Tensor, k: int, dtype: torch.dtype | None = None) -> Tensor:
    """[K] per-group sums of ``values`` [B] over dense group ids ``idx``, in ``dtype`` (default: the values'),
    on the values' device; differentiable (index_add, not in place), so losses may use it."""
    dtype = dtype or values.dtype
    out = torch.zeros(k, dtype=dtype, device=values.device)
    return out.index_add(0, idx.to(values.device), values.to(dtype))


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


def group_rank(group: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: its 0-based position among its group's rows (order of appearance) and the group size."""
    idx, k = group_index(group)
    rank = torch.zeros_like(idx)
    size = torch.zeros(k, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx))
    seen = torch.zeros(k, dtype=torch.long)
    for i, g in enumerate(idx.tolist()):
        rank[i] = seen[g]
        seen[g] += 1
    return rank, size[idx]


# -- outcome facts shared by every family ----------------------------------------------------------------


def correctness(rollouts, threshold: float = 0.0) -> Tensor:
    """[B] float, 1.0 where the rollout is correct: the ``accuracy`` reward component when the batch has one
    (correct iff > 0.5), else the total reward > ``threshold``. A failed (NaN) value counts as incorrect.

    The one definition of "correct" in policylab; components with a different rule (a ``>=`` threshold, no
    accuracy component, NaN kept as "unknown") define their own and say so.
    """
    if "accuracy" in rollouts.reward_components:
        acc = rollouts.reward_components["accuracy"].float()
        return (torch.nan_to_num(acc, nan=0.0) > 0.5).float()
    if rollouts.rewards is None:
        raise ValueError("correctness needs rollouts.rewards; run the reward stage first")
    r = rollouts.rewards.float()
    return (torch.nan_to_num(r, nan=threshold - 1.0) > threshold).float()


def zero_failed(adv: Tensor, rollouts) -> Tensor:
    """Rows whose reward failed (NaN) get advantage 0, whatever a shaping added (the advantage contract).
    ``adv`` is [B] or [B,T]."""
    if rollouts.rewards is None:
        return adv
    failed = torch.isnan(rollouts.rewards.float())
    if not bool(failed.any()):
        return adv
    shape = (-1,) + (1,) * (adv.dim() - 1)
    return torch.where(failed.view(shape).to(adv.device), torch.zeros_like(adv), adv)
