"""VPPO (arXiv:2510.09285), text analogue: weight tokens by how much their prediction depends on the prompt.

The dependency of token t is κ = k3 between its log-prob under the true prompt and under a corrupted
prompt ("aug"). The registered ``vppo`` component (policylab/annotate/perception.py) computes the
corrupted-prompt log-probs in its ``annotate`` hook (field ``vppo_aug_logp``) and uses
:class:`PerceptionTokenWeights` below for the weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import old_logp_of
from policylab.rollouts import PolicyOutputs, Rollouts


def perception_kl(old_logp: Tensor, aug_logp: Tensor) -> Tensor:
    """κ = clamp(e^d − d − 1, 0, 10), d = clamp(aug − old, −20, 20) (k3 between true and corrupted input)."""
    d = (aug_logp - old_logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(0.0, 10.0)


def top_tokens_per_row(score: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Per response keep the top k_i = ⌈fraction·L_i⌉ tokens by ``score`` (valid tokens only)."""
    keep = torch.zeros_like(mask, dtype=torch.float32)
    lengths = (mask > 0).sum(-1)
    masked = torch.where(mask > 0, score.float(), torch.full_like(score, -math.inf, dtype=torch.float32))
    for i in range(score.shape[0]):
        k = min(int(lengths[i]), math.ceil(fraction * int(lengths[i]) - 1e-9))
        if k > 0:
            keep[i, torch.topk(masked[i], k).indices] = 1.0
    return keep


def trajectory_scaling(kappa: Tensor, mask: Tensor, t_min: float = 0.9) -> Tensor:
    """f_i = t_min + n_i(t_max − t_min), n = min-max normalised mean κ, t_max = t_min + (1 − t_min)/(mean n + 1e-8).

    Over the valid rows of the (micro-)batch; a spread ≤ 1e-6 (or no valid row) gives f = 1.
    """
    lengths = mask.sum(-1)
    valid = lengths > 0
    s = (kappa * mask).sum(-1) / lengths.clamp(min=1)
    if not bool(valid.any()):
        return torch.ones_like(s)
    s_min, s_max = s[valid].min(), s[valid].max()
    if float(s_max - s_min) <= 1e-6:
        return torch.ones_like(s)
    n = ((s - s_min) / (s_max - s_min)).clamp(0.0, 1.0)
    mu = n[valid].mean()
    t_max = t_min + (1 - t_min) / (mu + 1e-8)
    return torch.where(valid, t_min + n * (t_max - t_min), torch.ones_like(s))


class PerceptionTokenWeights:
    """VPPO token weights (arXiv:2510.09285, text analogue): train on the ⌈ρ·L_i⌉ tokens with the largest
    κ = k3(old, aug) and scale each trajectory by f_i (its mean κ, min-max normalised, mean f = 1).

    Weights = mask·f_i, which for PPO-clip equals A_i ← f_i·A_i on the kept tokens (f > 0). "old" is the
    batch's ``old_logp`` when stored, else the training forward's detached log-probs (on-policy). VPPO's
    entropy penalty c_H·(−mean log π) is the ``papo`` regularizer with gamma 0, eta_ori c_H.
    """

    aug_field = "vppo_aug_logp"

    def __init__(self, top_fraction: float = 0.4, scaling_min: float = 0.9):
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"vppo top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction, self.scaling_min = top_fraction, scaling_min

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if self.aug_field not in batch.extras:
            raise ValueError(f"vppo: rollouts.extras has no {self.aug_field}; its annotate(rollouts, ctx) must run first")
        device = out.logp.device
        mask = batch.completion_mask.to(device)
        kappa = perception_kl(old_logp_of(out, batch).detach().to(device), batch.extras[self.aug_field].to(device)) * mask
        keep = top_tokens_per_row(kappa, mask, self.top_fraction)
        factor = trajectory_scaling(kappa, mask, self.scaling_min)
        rejected = mask * (1 - keep)
        metrics = {
            "vppo/token_frac": keep.sum() / mask.sum().clamp(min=1),
            "vppo/kappa_selected": (kappa * keep).sum() / keep.sum().clamp(min=1),
            "vppo/kappa_rejected": (kappa * rejected).sum() / rejected.sum().clamp(min=1),
            "vppo/scaling_max": factor.max(),
            "vppo/scaling_mean": factor[mask.sum(-1) > 0].mean() if bool((mask.sum(-1) > 0).any()) else torch.tensor(1.0),
        }
        return keep * factor[:, None], metrics
