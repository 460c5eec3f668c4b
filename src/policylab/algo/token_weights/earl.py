"""EARL (arXiv:2511.12033): the policy gradient only on the highest-entropy tokens.

Token weights multiply the objective's per-token loss; the aggregation's denominator still counts every
trained token (TRL semantics), so gated-off tokens contribute zero rather than being renormalised away.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_fraction: float) -> tuple[Tensor, Tensor]:
    """m = 1[H ≥ θ]·M, θ = linear-interpolated quantile (1 − ρ) of H over valid tokens (ties kept).

    Returns (mask, θ); no valid token -> all-zero mask and θ = 0.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    valid = mask > 0
    if not bool(valid.any()):
        return torch.zeros_like(mask, dtype=torch.float32), torch.tensor(0.0)
    theta = torch.quantile(entropy[valid].float(), 1.0 - top_fraction)
    return ((entropy >= theta) & valid).float(), theta


@register("token_weights", "earl", spec="arXiv:2511.12033 (reconstructed; threshold as TRL top_entropy_quantile)")
def earl_weights(out: PolicyOutputs, batch: Rollouts, *, top_fraction: float = 0.2) -> tuple[Tensor, dict]:
    """EARL (arXiv:2511.12033): weight 1 on tokens whose entropy is at least the (1 − ρ) quantile of the
    valid tokens' entropies, 0 elsewhere (the training forward's entropy, detached).

    The quantile runs over the micro-batch's valid tokens (TRL ``top_entropy_quantile`` semantics; not
    gathered across micro-batches). ρ = 0.2 is the 80/20 default; EARL's own fraction was not recovered.
    """
    if out.entropy is None:
        raise ValueError("earl needs PolicyOutputs.entropy from the training forward")
    entropy = out.entropy.detach()
    mask = batch.completion_mask.to(entropy.device)
    keep, theta = high_entropy_mask(entropy, mask, top_fraction)
    dropped = mask * (1 - keep)
    metrics = {
        "earl/kept_frac": keep.sum() / mask.sum().clamp(min=1),
        "earl/threshold": theta,
        "earl/entropy_kept": (entropy * keep).sum() / keep.sum().clamp(min=1),
        "earl/entropy_dropped": (entropy * dropped).sum() / dropped.sum().clamp(min=1),
    }
    return keep, metrics
