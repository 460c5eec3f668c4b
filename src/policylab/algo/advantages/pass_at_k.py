"""Advantages that train for pass@k instead of pass@1.

Two papers go by "pass@k GRPO": verl's ``grpo_passk`` (Tang et al., arXiv:2503.19595: the leave-one-out gradient of
the group's max reward, only the best response learns) and Pass@k Training (Chen et al., arXiv:2508.10751: the
closed-form advantages of the group's pass@k reward for binary rewards). Both are here, under their own names.
"""

from __future__ import annotations

from math import comb

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import rewards_of
from policylab.algo.group_stats import correctness, group_index, zero_failed
from policylab.registry import register
from policylab.rollouts import Rollouts


@register("advantage", "grpo_passk", spec="arXiv:2503.19595 (max-reward leave-one-out; verl adv_estimator='grpo_passk')",
          requires=("rewards",))
@torch.no_grad()
def grpo_passk_advantage(rollouts: Rollouts, *, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """verl's pass@k GRPO (Tang et al., arXiv:2503.19595): the objective is the group's best reward max_j r_j;
    its leave-one-out gradient credits only the best response, A_best = r_(1) - r_(2) (its margin over the
    runner-up), every other response 0; ``scale="group"`` divides by the group's reward std (verl's
    norm_adv_by_std_in_grpo), "none" keeps the margin.

    Ties at the top give 0 (the margin). Failed (NaN) rewards are left out; a group with fewer than two valid
    rewards gets 0. Groups of one completion are an error (the estimator needs a runner-up).
    """
    if scale not in ("group", "none"):
        raise ValueError(f"grpo_passk scale must be 'group' or 'none', got {scale!r}")
    r = rewards_of(rollouts, "grpo_passk")
    idx, k = group_index(rollouts.group)
    adv = torch.zeros_like(r)
    for g in range(k):
        rows = (idx == g).nonzero().flatten()
        if len(rows) < 2:
            raise ValueError(f"grpo_passk needs at least 2 completions per prompt; prompt {int(rollouts.group[rows[0]])} "
                             f"has {len(rows)} (set rollout.group_size >= 2)")
        valid = rows[~torch.isnan(r[rows])]
        if len(valid) < 2:
            continue
        top = torch.topk(r[valid], 2)
        margin = top.values[0] - top.values[1]
        if scale == "group":
            margin = margin / (r[valid].std() + eps)
        adv[valid[top.indices[0]]] = margin
    return zero_failed(adv, rollouts)


def passk_group_advantages(n: int, n_pos: int, k: int) -> tuple[float, float]:
    """(A_pos, A_neg) of Pass@k Training's analytical estimator for a group of n binary rewards, n_pos correct:
    R = 1 - C(n_neg, k) / C(n, k) (the group's expected pass@k over k-subsets), sigma = sqrt(R (1 - R)),
    A_pos = (1 - R) / sigma, A_neg = (1 - R - C(n_neg - 1, k - 1) / C(n - 1, k - 1)) / sigma; both 0 when sigma = 0."""
    n_neg = n - n_pos
    mean = 1.0 - comb(n_neg, k) / comb(n, k)
    sigma = (mean * (1.0 - mean)) ** 0.5
    if sigma == 0:
        return 0.0, 0.0
    a_pos = (1.0 - mean) / sigma
    a_neg = (1.0 - mean - (comb(n_neg - 1, k - 1) / comb(n - 1, k - 1) if n_neg > 0 else 0.0)) / sigma
    return a_pos, a_neg


@register("advantage", "passk_training", spec="arXiv:2508.10751 §3 (Pass@k Training, analytical advantages)",
          requires=("rewards",))
@torch.no_grad()
def passk_training_advantage(rollouts: Rollouts, *, k: int = 4) -> Tensor:
    """Pass@k Training (Chen et al., arXiv:2508.10751 §3, analytical derivation): the reward of a k-subset of the
    group is 1 if any member is correct; averaging the group-normalised subset reward over all C(N, k) subsets a
    response belongs to gives, for N responses with N_neg wrong, R = 1 - C(N_neg, k)/C(N, k),
    sigma = sqrt(R(1 - R)), A_correct = (1 - R)/sigma and A_wrong = (1 - R - C(N_neg-1, k-1)/C(N-1, k-1))/sigma.

    k = 1 is GRPO with the population std ((r - p)/sqrt(p(1-p))). Correctness is the batch's binary outcome
    (policylab.algo.group_stats.correctness: the ``accuracy`` component, else reward > 0). k larger than a group
    is an error naming the group.
    """
    if k < 1:
        raise ValueError(f"passk_training k must be >= 1, got {k}")
    correct = correctness(rollouts)
    idx, n_groups = group_index(rollouts.group)
    adv = torch.zeros(len(correct), dtype=torch.float32)
    for g in range(n_groups):
        rows = (idx == g).nonzero().flatten()
        if len(rows) < k:
            raise ValueError(f"passk_training k={k} exceeds the group of prompt {int(rollouts.group[rows[0]])} "
                             f"({len(rows)} completions); use k <= rollout.group_size")
        a_pos, a_neg = passk_group_advantages(len(rows), int(correct[rows].sum()), k)
        adv[rows] = torch.where(correct[rows] > 0, torch.tensor(a_pos), torch.tensor(a_neg))
    return zero_failed(adv, rollouts)
