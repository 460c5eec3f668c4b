"""Soft trust regions: smooth weights of the importance ratio instead of a hard clip — SAPO's sigmoid gate per
token and VESPO's Gamma kernel per sequence. Both equal REINFORCE on-policy (the weight and its slope are 1 at
ratio 1) and shrink the update smoothly as the ratio leaves 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import (
    LOG_RATIO_CLAMP,
    masked_mean,
    ratio_metrics,
    token_log_ratio,
)
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def sapo_gate(ratio: Tensor, tau: Tensor) -> Tensor:
    """SAPO's soft gate f_tau(r) = sigmoid(tau (r - 1)) * 4 / tau: f(1) = 2/tau and f'(1) = 1 for every tau."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


@register("objective", "sapo", spec="arXiv:2511.20347 §3 (SAPO soft gate; TRL loss_type='sapo', verl loss_mode='sapo')")
def sapo_loss(out: PolicyOutputs, batch: Rollouts, *, tau_pos: float = 1.0, tau_neg: float = 1.05) -> tuple[Tensor, dict]:
    """SAPO (Soft Adaptive Policy Optimization, arXiv:2511.20347 §3): the hard clip of PPO becomes a smooth,
    temperature-controlled gate on the token ratio, l = -f_tau(rho) * A with f_tau(rho) = sigmoid(tau (rho - 1)) * 4/tau,
    tau = tau_pos where A > 0 and tau_neg otherwise (tau_neg > tau_pos damps negative updates faster).

    The gradient is -A * rho * f'(rho) * d logp = -A * 4 rho s(1-s) * d logp (s = the sigmoid): 1 at rho = 1, so
    on-policy SAPO is REINFORCE; far from 1 it decays smoothly instead of dropping to 0. Defaults are the
    anchors' (TRL sapo_temperature_pos/neg = 1.0/1.05, verl tau_pos/tau_neg); both aggregate seq-mean-token-mean.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"sapo tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    tau = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = sapo_gate(ratio, tau)
    s = torch.sigmoid(tau * (ratio.detach() - 1.0))
    metrics = ratio_metrics(ratio, log_ratio, mask)
    metrics["sapo/grad_weight_mean"] = masked_mean(4.0 * ratio.detach() * s * (1 - s), mask)
    return -gate * adv, metrics


def sequence_advantage(batch: Rollouts) -> Tensor:
    """[B] the mean advantage over each row's trained tokens (the outcome advantage for [B] advantages)."""
    mask = batch.completion_mask
    return (batch.seq_advantages() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def vespo_log_weight(seq_log_ratio: Tensor, k: Tensor, lam: Tensor) -> Tensor:
    """log phi(W) = k log W + lam (1 - W), W = exp(seq_log_ratio): the log of VESPO's Gamma kernel, phi(1) = 1."""
    w = torch.exp(seq_log_ratio)
    return k * seq_log_ratio + lam * (1.0 - w)


@register("objective", "vespo", spec="arXiv:2602.10693 (VESPO Gamma kernel; TRL loss_type='vespo')")
def vespo_loss(out: PolicyOutputs, batch: Rollouts, *, k_pos: float = 2.0, lambda_pos: float = 3.0,
               k_neg: float = 3.0, lambda_neg: float = 2.0) -> tuple[Tensor, dict]:
    """VESPO (Variational Sequence-Level Soft Policy Optimization, arXiv:2602.10693): every token of sequence i is
    trained by REINFORCE scaled by a detached Gamma kernel of the sequence's TRUE importance weight,
    l = -sg(phi(W_i)) * A * logp, W_i = prod_t rho_t (no 1/L power), phi(W) = W^k * exp(lam (1 - W)),
    (k, lam) = (k_pos, lambda_pos) where the sequence advantage is >= 0, else (k_neg, lambda_neg).

    phi(1) = 1, so on-policy VESPO is REINFORCE; phi peaks at W = k/lam and decays for stale (W << 1) and
    runaway (W >> 1) sequences. Defaults are TRL's / the authors' release (k 2/3, lambda 3/2); TRL normalises
    vespo like DAPO (token-mean). Spec choice: the sign is that of the row's mean advantage (the authors read the
    first token's), identical for outcome advantages.
    """
    if min(lambda_pos, lambda_neg) <= 0:
        raise ValueError(f"vespo lambda_pos and lambda_neg must be > 0, got {lambda_pos}, {lambda_neg}")
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    seq_log_w = (log_ratio.detach() * mask).sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    positive = sequence_advantage(batch) >= 0
    k = torch.where(positive, torch.full_like(seq_log_w, k_pos), torch.full_like(seq_log_w, k_neg))
    lam = torch.where(positive, torch.full_like(seq_log_w, lambda_pos), torch.full_like(seq_log_w, lambda_neg))
    phi = torch.nan_to_num(torch.exp(vespo_log_weight(seq_log_w, k, lam)), nan=0.0, posinf=0.0)
    has = (mask.sum(-1) > 0).float()
    metrics = ratio_metrics(torch.exp(log_ratio), log_ratio, mask)
    metrics["vespo/phi_mean"] = (phi * has).sum() / has.sum().clamp(min=1)
    metrics["vespo/log_w_mean"] = (seq_log_w * has).sum() / has.sum().clamp(min=1)
    return -phi[:, None] * adv * out.logp, metrics
