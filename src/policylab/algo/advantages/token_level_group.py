"""HAPO's token-level group average: a group baseline whose statistics weight every response by its number of
tokens, so each valid token carries its response's standardised reward."""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.advantages.reductions import group_sum, rewards_of
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts


@register("advantage", "hapo", spec="arXiv:2509.16591 (HAPO's token-level group average)", requires=("rewards",))
@torch.no_grad()
def hapo_advantage(rollouts: Rollouts, *, eps: float = 1e-6, fallback_threshold: float = 5.0) -> Tensor:
    """HAPO's advantage (arXiv:2509.16591; exact from the released code): the group's reward mean and std are taken
    over tokens, not responses, so every valid token carries its response's reward.

    mu_g = sum_i L_i R_i / sum_i L_i, sigma_g = sqrt(sum_i L_i (R_i - mu_g)^2 / sum_i L_i) (population,
    token-weighted), A_i = (R_i - mu_g)/(sigma_g + eps). A group with any |A_i| >= fallback_threshold uses
    the GRPO advantage instead. Failed rows (NaN reward) are left out of the statistics and get 0.
    """
    r = rewards_of(rollouts, "hapo advantage").double()
    valid = ~torch.isnan(r)
    weight = torch.where(valid, rollouts.lengths.double(), torch.zeros_like(r))
    r0 = torch.where(valid, r, torch.zeros_like(r))
    idx, k = group_index(rollouts.group)
    total_w = group_sum(weight, idx, k)
    mean = group_sum(weight * r0, idx, k) / total_w.clamp(min=1e-12)
    var = group_sum(weight * (r0 - mean[idx]) ** 2, idx, k) / total_w.clamp(min=1e-12)
    adv = (r0 - mean[idx]) / (var.sqrt()[idx] + eps)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    too_large = group_sum((adv.abs() >= fallback_threshold).double(), idx, k) > 0
    fallback = grpo_advantage(rollouts, eps=eps).double()
    adv = torch.where(too_large[idx], fallback, adv)
    return nan_to_zero(adv).to(rollouts.rewards.dtype)
