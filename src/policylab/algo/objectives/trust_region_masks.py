"""Divergence trust regions as token masks: DPPO's binary-TV and binary-KL masks (prime-rl's default loss,
verl ``dppo_tv`` / ``dppo_kl``). PPO's ratio clip over-constrains rare tokens (a tiny probability change is a big
ratio) and under-constrains likely ones; DPPO masks a token's gradient only when the divergence between the old and
the new probability of the sampled token leaves the trust region in the direction the advantage pushes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import masked_mean, old_logp_of, ratio_metrics, token_log_ratio
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def binary_tv_keep(p: Tensor, p_old: Tensor, adv: Tensor, delta_low: float, delta_high: float) -> Tensor:
    """DPPO-Binary-TV mask: keep where A > 0 and p - p_old <= delta_high, or A <= 0 and p - p_old >= -delta_low."""
    diff = p - p_old
    return torch.where(adv > 0, diff <= delta_high, diff >= -delta_low)


def binary_kl(p: Tensor, p_old: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(Bern(p_old) || Bern(p)) = p_old log(p_old/p) + (1-p_old) log((1-p_old)/(1-p)): the divergence of the
    two-outcome (sampled token vs the rest) distributions, computable from the sampled token's probabilities."""
    return p_old * (torch.log(p_old + eps) - torch.log(p + eps)) + (1 - p_old) * torch.log((1 - p_old + eps) / (1 - p + eps))


def binary_kl_keep(p: Tensor, p_old: Tensor, adv: Tensor, delta_low: float, delta_high: float) -> Tensor:
    """DPPO-Binary-KL mask: keep where the binary KL is inside the bound, or where the token moved against
    the advantage's push (A > 0 and p <= p_old; A <= 0 and p >= p_old), which the trust region never blocks."""
    kl = binary_kl(p, p_old)
    return torch.where(adv > 0, (kl <= delta_high) | (p <= p_old), (kl <= delta_low) | (p >= p_old))


def dppo_surrogate(out: PolicyOutputs, batch: Rollouts, keep_fn, *, delta_low: float, delta_high: float,
                   ratio_cap: float, kl_coef: float, who: str) -> tuple[Tensor, dict]:
    """l = -A * sg(min(rho, C)) * exp(logp - sg(logp)) * M + kl_coef * (log rho)^2: value -A min(rho, C) on kept
    tokens, gradient -A min(rho, C) d logp (truncated importance sampling, arXiv:2602.04879 §5.4), M the mask."""
    if delta_low < 0 or delta_high < 0 or ratio_cap <= 0:
        raise ValueError(f"{who}: delta_low, delta_high must be >= 0 and ratio_cap > 0, got {delta_low}, {delta_high}, {ratio_cap}")
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    p, p_old = torch.exp(out.logp.detach()), torch.exp(old_logp_of(out, batch).float())
    keep = keep_fn(p, p_old, adv, delta_low, delta_high).float()
    weight = ratio.detach().clamp(max=ratio_cap)
    loss = -adv * weight * torch.exp(out.logp - out.logp.detach()) * keep
    if kl_coef:
        loss = loss + kl_coef * log_ratio**2
    metrics = ratio_metrics(ratio, log_ratio, mask)
    metrics["clipfrac"] = masked_mean(1.0 - keep, mask)
    metrics[f"{who}/truncated_frac"] = masked_mean((ratio.detach() > ratio_cap).float() * keep, mask)
    return loss, metrics


@register("objective", "dppo_tv", spec="arXiv:2602.04879 (DPPO-Binary-TV; prime-rl default loss, verl loss_mode='dppo_tv')")
def dppo_tv_loss(out: PolicyOutputs, batch: Rollouts, *, delta_low: float = 0.2, delta_high: float = 0.2,
                 ratio_cap: float = 20.0, kl_coef: float = 0.0) -> tuple[Tensor, dict]:
    """DPPO-Binary-TV (Rethinking the Trust Region in LLM RL, arXiv:2602.04879): REINFORCE with a truncated
    importance weight, masked where the sampled token's probability moved past the total-variation bound in the
    advantage's direction: l = -A * sg(min(rho, C)) * logp-gradient * 1[keep], keep = (p - p_old <= delta_high) for
    A > 0, (p - p_old >= -delta_low) for A <= 0.

    Defaults: delta 0.2/0.2 = prime-rl's dppo_mask_low/high, C = 20 = verl's clip_ratio_c. ``kl_coef`` adds
    prime-rl's squared-log-ratio term tau_KL * (log rho)^2 (its default 1e-3; 0 here, so zero advantage gives
    zero gradient; the ``dppo`` recipe sets prime-rl's value). Equals REINFORCE on-policy (rho = 1, all kept).
    """
    return dppo_surrogate(out, batch, binary_tv_keep, delta_low=delta_low, delta_high=delta_high,
                          ratio_cap=ratio_cap, kl_coef=kl_coef, who="dppo_tv")


@register("objective", "dppo_kl", spec="arXiv:2602.04879 (DPPO-Binary-KL; verl loss_mode='dppo_kl')")
def dppo_kl_loss(out: PolicyOutputs, batch: Rollouts, *, delta_low: float = 0.05, delta_high: float = 0.05,
                 ratio_cap: float = 20.0, kl_coef: float = 0.0) -> tuple[Tensor, dict]:
    """DPPO-Binary-KL (arXiv:2602.04879): as ``dppo_tv`` but the trust region is the KL between the old and new
    Bernoulli(sampled token) distributions, D = p_old log(p_old/p) + (1-p_old) log((1-p_old)/(1-p)); a token is
    masked only when D exceeds the bound AND it moved in the advantage's direction (up for A > 0, down for A <= 0).

    Defaults: delta 0.05/0.05, the authors' verl example (examples/dppo_trainer: 0.05 for KL, 0.15 for TV), C = 20;
    ``kl_coef`` as ``dppo_tv``. Equals REINFORCE on-policy.
    """
    return dppo_surrogate(out, batch, binary_kl_keep, delta_low=delta_low, delta_high=delta_high,
                          ratio_cap=ratio_cap, kl_coef=kl_coef, who="dppo_kl")
