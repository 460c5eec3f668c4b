"""CalibRL's expert-calibrated guide term (arXiv:2602.20197), the loss itself.

The expert trajectory's log-probs under the current policy are a per-position baseline: passing
rollouts are pulled above it, failing ones pushed below, weighted by the rollout's |advantage| (its
group rareness). The scoring pass that provides the expert log-probs is policylab/annotate/expert_scoring.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def calibrl_guide_loss(logp: Tensor, expert_logp: Tensor, passed: Tensor, abs_adv: Tensor, *, slope: float = 0.5) -> Tensor:
    """ℓ_guide[i,t] = LeakyReLU(−(2·pass_i − 1)(log π_θ(o_{i,t}) − e_t), slope)·|A_i|.

    Passing rollouts are pulled above the expert's log-prob at the same position, failing ones pushed
    below it; the weight |A_i| is the group rareness of the rollout's outcome.
    """
    sign = (2 * passed.float() - 1)[:, None]
    g = -sign * (logp - expert_logp)
    return torch.nn.functional.leaky_relu(g, negative_slope=slope) * abs_adv
