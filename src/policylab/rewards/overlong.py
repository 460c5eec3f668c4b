"""DAPO soft overlong punishment (objectives.md §1.3) as a reward-shaping stage."""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.registry import register
from policylab.rollouts import Rollouts


def soft_overlong_penalty(lengths: Tensor, max_len: float, cache_len: float, penalty_factor: float = 1.0) -> Tensor:
    """R_len = min(-(|y| - (L_max - L_cache)) / L_cache * factor, 0): 0 up to L_max - L_cache, -factor at L_max."""
    expected = max_len - cache_len
    return torch.clamp(-(lengths.float() - expected) / cache_len * penalty_factor, max=0.0)


@register("reward_shaping", "soft_overlong", spec="objectives.md §1.3")
def soft_overlong(
    rollouts: Rollouts,
    *,
    max_len: int | None = None,
    cache_len: int | None = None,
    buffer_fraction: float = 0.2,
    penalty_factor: float = 1.0,
) -> tuple[Tensor, dict]:
    """Add R_len to each reward. ``max_len`` defaults to the run's max_new_tokens (rollouts.extras),
    ``cache_len`` to ``buffer_fraction * max_len`` (DAPO: 4096 of 20480)."""
    max_len = max_len or rollouts.extras.get("max_new_tokens")
    if not max_len:
        raise ValueError("soft_overlong needs max_len (or rollouts.extras['max_new_tokens'])")
    cache_len = cache_len or max(1, round(buffer_fraction * max_len))
    lengths = rollouts.lengths.float()
    penalty = soft_overlong_penalty(lengths, float(max_len), float(cache_len), penalty_factor)
    return penalty, {"overlong/penalty_mean": float(penalty.mean()), "overlong/penalised_frac": float((penalty < 0).float().mean())}
