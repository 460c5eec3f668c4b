"""Entropy control through the covariance of log-probability and advantage (Clip-Cov and KL-Cov).

The Entropy Mechanism paper (arXiv:2505.22617) shows the policy entropy changes by minus the covariance between a
token's log-probability and its advantage; a few tokens with a large centred cross-product
c_t = (logp_t - mean logp) * (A_t - mean A) drive the entropy collapse. Clip-Cov removes the gradient of a few such
tokens; KL-Cov adds a KL penalty on the top ones. Both statistics are over the tokens of the batch the objective is
called with — the micro-batch, as in the authors' release and verl — hence ``skip:T-MICRO``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import clipped_surrogate, masked_mean, ratio_metrics, token_log_ratio
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def centred_cross_product(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """c_t = (logp_t - mean logp) (A_t - mean A), means over the valid tokens (detached; 0 on padding)."""
    logp, adv = logp.detach(), adv.detach()
    return (logp - masked_mean(logp, mask)) * (adv - masked_mean(adv, mask)) * mask


def clip_cov_selection(cov: Tensor, candidates: Tensor, n_valid: int, ratio: float, generator: torch.Generator) -> Tensor:
    """[B,T] bool: max(1, int(ratio * n_valid)) tokens drawn uniformly (without replacement) from ``candidates``."""
    chosen = torch.zeros_like(candidates)
    idx = candidates.nonzero()
    if len(idx) == 0:
        return chosen
    n = min(max(int(ratio * n_valid), 1), len(idx))
    pick = idx[torch.randperm(len(idx), generator=generator)[:n]]
    chosen[pick[:, 0], pick[:, 1]] = True
    return chosen


class ClipCov:
    """Clip-Cov (arXiv:2505.22617 §4, Clip-Cov): PPO-clip, except that r*N tokens drawn at random among those with
    omega_low < c_t < omega_high (and not already clipped by PPO) lose their gradient: l = max(-A rho, -A clip(rho)) * (1 - 1[t chosen]).

    Defaults are the paper's / verl's (r = 2e-4, omega 1..5, eps 0.2); at least one token is chosen when any
    qualifies (verl's rule). The draw uses a generator seeded with ``seed`` + the call count, so a run is
    reproducible. ``skip:T-ONPOL``: the chosen tokens' gradient is removed on-policy too (that is the method).
    """

    def __init__(self, ratio: float = 2e-4, omega_low: float = 1.0, omega_high: float = 5.0,
                 eps_low: float = 0.2, eps_high: float = 0.2, seed: int = 0):
        if ratio <= 0 or omega_high <= omega_low:
            raise ValueError(f"clip_cov needs ratio > 0 and omega_low < omega_high, got {ratio}, {omega_low}, {omega_high}")
        self.ratio, self.omega_low, self.omega_high = ratio, omega_low, omega_high
        self.eps_low, self.eps_high, self.seed, self.calls = eps_low, eps_high, seed, 0

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        adv = batch.seq_advantages()
        log_ratio = token_log_ratio(out, batch)
        ratio = torch.exp(log_ratio)
        loss, is_clipped, _ = clipped_surrogate(ratio, adv, self.eps_low, self.eps_high, None)
        cov = centred_cross_product(out.logp, adv, mask)
        valid = mask > 0
        candidates = valid & ~is_clipped & (cov > self.omega_low) & (cov < self.omega_high)
        generator = torch.Generator().manual_seed(self.seed + self.calls)
        self.calls += 1
        chosen = clip_cov_selection(cov, candidates, int(valid.sum()), self.ratio, generator)
        metrics = ratio_metrics(ratio, log_ratio, mask)
        metrics["clipfrac"] = masked_mean(is_clipped.float(), mask)
        metrics["clip_cov/detached_frac"] = masked_mean(chosen.float(), mask)
        return loss * (~chosen).float(), metrics


register("objective", "clip_cov", spec="arXiv:2505.22617 §4 (Clip-Cov; verl loss_mode='clip_cov')",
         tags=("skip:T-ONPOL", "skip:T-MICRO"))(ClipCov)


def kl_cov_selection(cov: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """[B,T] bool: the max(1, int(ratio * N)) valid tokens with the largest c_t (N = valid tokens)."""
    chosen = torch.zeros_like(mask, dtype=torch.bool)
    valid = mask > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        return chosen
    flat = cov.masked_fill(~valid, float("-inf")).flatten()
    top = torch.topk(flat, min(max(int(ratio * n_valid), 1), n_valid)).indices
    chosen.view(-1)[top] = True
    return chosen


@register("objective", "kl_cov", spec="arXiv:2505.22617 §4 (KL-Cov; verl loss_mode='kl_cov')",
          tags=("skip:T-ZEROADV", "skip:T-MICRO"))
def kl_cov_loss(out: PolicyOutputs, batch: Rollouts, *, ratio: float = 2e-4, kl_coef: float = 1.0) -> tuple[Tensor, dict]:
    """KL-Cov (arXiv:2505.22617 §4, KL-Cov): the unclipped surrogate -A rho on every token, plus a KL penalty on the
    k*N tokens with the largest centred cross-product c_t: l = -A rho + kl_coef * |log rho| * 1[t in top-k].

    Spec choice: the penalty is |log(pi/pi_old)|, as in the authors' release and verl (the paper writes
    KL(pi_old || pi)); k = 2e-4 and coefficient 1 are verl's defaults (the paper used k = 2e-3 at 7B). On-policy the
    penalty's gradient is 0, so it is REINFORCE. ``skip:T-ZEROADV``: off-policy, a zero-advantage token among the
    top-k is still pulled back towards pi_old by the penalty (a regulariser, by design).
    """
    if ratio <= 0:
        raise ValueError(f"kl_cov ratio must be > 0, got {ratio}")
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio_t = torch.exp(log_ratio)
    chosen = kl_cov_selection(centred_cross_product(out.logp, adv, mask), mask, ratio)
    loss = -adv * ratio_t + kl_coef * log_ratio.abs() * chosen.float()
    metrics = ratio_metrics(ratio_t, log_ratio, mask)
    metrics["kl_cov/penalised_frac"] = masked_mean(chosen.float(), mask)
    return loss, metrics
