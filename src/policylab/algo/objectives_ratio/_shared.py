"""Small tensor helpers shared by the ratio-family objectives (no components here)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from policylab.rollouts import PolicyOutputs, Rollouts


def batch_statistic(batch: Rollouts, key: str, compute: Callable[[Rollouts], Tensor]) -> Tensor:
    """``batch.extras[key]`` when a ``prepare`` hook stored it for the whole rollout batch, else ``compute(batch)``."""
    value = batch.extras.get(key)
    if value is not None:
        return torch.as_tensor(value)
    return compute(batch)


def require_rewards(batch: Rollouts, who: str) -> Tensor:
    if batch.rewards is None:
        raise ValueError(f"{who} needs rollouts.rewards (group statistics of the rewards); run the reward stage first")
    return batch.rewards.float()


def token_entropy(out: PolicyOutputs, batch: Rollouts, who: str, prefer: str = "current") -> Tensor:
    """Detached token entropy [B,T]: the training forward's (``prefer='current'``) or the collection-time one.

    Falls back to the other source when the preferred one is missing; raises naming both when neither is there.
    """
    sources = (out.entropy, batch.entropy) if prefer == "current" else (batch.entropy, out.entropy)
    for entropy in sources:
        if entropy is not None:
            return entropy.detach().float()
    raise ValueError(f"{who} needs token entropies: PolicyOutputs.entropy or rollouts.entropy")


def masked_max(x: Tensor, mask: Tensor, empty: float = 0.0) -> Tensor:
    valid = mask > 0
    return x[valid].max() if valid.any() else torch.tensor(empty, dtype=x.dtype, device=x.device)


def masked_min(x: Tensor, mask: Tensor, empty: float = 0.0) -> Tensor:
    valid = mask > 0
    return x[valid].min() if valid.any() else torch.tensor(empty, dtype=x.dtype, device=x.device)


def frac(flags: Tensor, mask: Tensor) -> Tensor:
    """Fraction of valid positions where ``flags`` holds (0 when there are none)."""
    return (flags.float() * mask).sum() / mask.sum().clamp(min=1)
