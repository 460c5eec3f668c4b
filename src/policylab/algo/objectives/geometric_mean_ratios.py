"""Sequence objectives built on the geometric mean of token ratios: GMPO (clip each token's log-ratio, then
take the geometric mean) and LUSPO (GSPO's sequence loss weighted by the sequence's length).

Both write each sequence's objective on every one of its tokens through the GSPO trick
s_tok = exp(sg(log s_i) + x_t - sg(x_t)) (value s_i, gradient s_i d x_t), so the recipe's aggregation divides it
exactly as the paper does; ``aggregates`` names that aggregation and the loader checks it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import gspo_loss, masked_mean, ratio_metrics, token_log_ratio
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def sign_aware_clip(log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """GMPO's token clip in log space, pessimistic in the advantage's direction: min(x, eps_high) where A > 0,
    max(x, -eps_low) where A < 0, 0 where A = 0 (sgn(A) * min(sgn(A) x, sgn(A) clip(x, -eps_low, eps_high)))."""
    sign = torch.sign(adv)
    clipped = log_ratio.clamp(-eps_low, eps_high)
    return sign * torch.minimum(sign * log_ratio, sign * clipped)


class GMPO:
    """GMPO (Geometric-Mean Policy Optimization, arXiv:2507.20673 §3): maximise A_i * (prod_t rho~_t)^(1/L_i), the
    geometric mean of the sign-aware clipped token ratios, log rho~_t = clip of log rho_t to [-eps_low, eps_high]
    on the side the advantage pushes (tokens past it get no gradient). The geometric mean is less sensitive to
    one outlier ratio than GRPO's arithmetic token mean, which lets GMPO use a wider range (e^+-0.4 in the paper).

    Per token l = -A * s_tok with s_tok = exp(sg(log s_i) + x~_t - sg(x~_t)), s_i = exp(mean_t x~_t): under the
    ``seq-mean-token-mean`` aggregation (declared) the loss is mean_i -A_i s_i and the gradient exactly GMPO's
    (-A_i s_i / L_i per unclipped token); on-policy it is REINFORCE. verl's ``geo_mean`` is this objective (it
    averages over all rows; here rows without trained tokens are left out, like every seq-mean aggregation).
    """

    aggregates = ("seq-mean-token-mean",)

    def __init__(self, eps_low: float = 0.4, eps_high: float = 0.4):
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"gmpo eps_low and eps_high must be >= 0 (log-space bounds), got {eps_low}, {eps_high}")
        self.eps_low, self.eps_high = eps_low, eps_high

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        adv = batch.seq_advantages()
        log_ratio = token_log_ratio(out, batch)
        clipped = sign_aware_clip(log_ratio, adv, self.eps_low, self.eps_high) * mask
        log_s = clipped.sum(-1) / mask.sum(-1).clamp(min=1)
        s_tok = torch.exp(log_s.detach()[:, None] + clipped - clipped.detach())
        metrics = ratio_metrics(torch.exp(log_ratio), log_ratio, mask)
        was_clipped = (clipped.detach() != (log_ratio.detach() * mask)).float()
        metrics["clipfrac/high"] = masked_mean(was_clipped * (adv > 0), mask)
        metrics["clipfrac/low"] = masked_mean(was_clipped * (adv < 0), mask)
        return -adv * s_tok, metrics


register("objective", "gmpo", spec="arXiv:2507.20673 §3 (GMPO; verl loss_mode='geo_mean', TRL experimental gmpo)")(GMPO)


def luspo_loss(out: PolicyOutputs, batch: Rollouts, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, dict]:
    """LUSPO (Length-Unbiased Sequence Policy Optimization, arXiv:2602.05261): GSPO's clipped sequence objective
    weighted by the sequence's length, J = mean_i L_i * min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i), so
    long responses are no longer pushed down by GSPO's per-sequence 1/L_i.

    The per-token loss is GSPO's (value equal on every token of a sequence); the declared ``seq-mean-token-sum``
    aggregation sums it over the L_i tokens, i.e. L_i times the sequence loss, and averages over sequences — TRL's
    ``loss_type='luspo'`` reduction (which also counts rows without tokens in the mean; here they are left out).
    Use it with sequence-level ratios, as TRL advises; on-policy it is REINFORCE.
    """
    return gspo_loss(out, batch, eps_low=eps_low, eps_high=eps_high)


luspo_loss.aggregates = ("seq-mean-token-sum",)
register("objective", "luspo", spec="arXiv:2602.05261 (LUSPO; TRL loss_type='luspo')")(luspo_loss)
