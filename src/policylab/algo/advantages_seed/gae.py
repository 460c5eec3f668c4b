"""PPO with a GAE critic (advantages_rewards.md A6): GAE over valid tokens, batch whitening, value loss.

The critic itself (a value head and its optimizer) lives outside this file: it must put its
collection-time values into ``rollouts.extras["values"]`` [B,T] (e.g. from a ``prepare`` hook) before the
advantage stage runs. The ``gae`` advantage then writes the pre-whitening returns to
``rollouts.extras["returns"]`` [B,T], the target of :func:`clipped_value_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages import masked_whiten, outcome_token_rewards
from policylab.algo.advantages_seed.common import require_extra, sequence_logp
from policylab.registry import register
from policylab.rollouts import Rollouts


def generalized_advantages(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(Â, returns), A6: delta_t = R_t + gamma V_next - V_t, Â_t = delta_t + gamma lam Â_next, Ret = Â + V.

    Right to left over t; V_next and Â_next belong to the next *valid* token (0 after the last one), so a
    masked tool/observation token in the middle of a response does not break the recursion. Masked
    positions get Â = Ret = 0.
    """
    mask = mask.float()
    batch, width = mask.shape
    advantages = torch.zeros(batch, width, dtype=torch.float32)
    next_value = torch.zeros(batch, dtype=torch.float32)
    next_adv = torch.zeros(batch, dtype=torch.float32)
    for t in range(width - 1, -1, -1):
        valid = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(valid, values[:, t].float(), next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_value_loss(values_new: Tensor, values_old: Tensor, returns: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Per-token ½ max((V_new - Ret)², (V_clip - Ret)²), V_clip = V_old + clip(V_new - V_old, ±clip) (A6).

    Returns (loss [B,T] to minimise before masking/aggregation, clipped [B,T] bool: the clipped branch won).
    """
    v_clip = values_old + (values_new - values_old).clamp(-clip, clip)
    unclipped = (values_new - returns) ** 2
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(Ret - V) / Var(Ret) over valid tokens; 0 when the returns have no variance."""
    valid = mask > 0
    ret, err = returns[valid], (returns - values)[valid]
    if ret.numel() < 2 or ret.var() == 0:
        return torch.tensor(0.0)
    return 1 - err.var() / ret.var()


@register("advantage", "gae", spec="advantages_rewards.md A6")
@torch.no_grad()
def gae_advantage(rollouts: Rollouts, *, gamma: float = 1.0, lam: float = 1.0, kl_coef: float = 0.0, whiten: bool = True) -> Tensor:
    """PPO GAE advantages [B,T] from critic values ``extras["values"]`` (A6; verl defaults gamma = lam = 1).

    Token rewards: the outcome reward on each completion's last valid token, minus ``kl_coef``·(log pi_old
    - log pi_ref) per token when ``kl_coef`` > 0 (KL-in-reward). Returns are stored before whitening in
    ``rollouts.extras["returns"]``; the advantages are batch-whitened (unbiased) unless ``whiten`` is off.
    Rows whose reward failed (NaN) get 0 and are left out of the whitening.
    """
    if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
        raise ValueError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    if rollouts.rewards is None:
        raise ValueError("gae needs rollouts.rewards; run the reward stage first")
    # failed (NaN-reward) rows get advantage 0 and stay out of the whitening statistics
    mask = rollouts.completion_mask.float() * (~torch.isnan(rollouts.rewards.float()))[:, None]
    values = require_extra(rollouts, "values", "gae", "critic values [B,T] written by the critic's prepare hook").float()
    if values.shape != mask.shape:
        raise ValueError(f"gae: extras['values'] has shape {tuple(values.shape)}, completion_mask {tuple(mask.shape)}")
    token_rewards = outcome_token_rewards(rollouts)
    if kl_coef:
        old = sequence_logp(rollouts)
        if old is None or rollouts.ref_logp is None:
            raise ValueError("gae with kl_coef > 0 needs old (or behaviour) and reference log-probs")
        token_rewards = token_rewards - kl_coef * (old - rollouts.ref_logp) * mask
    advantages, returns = generalized_advantages(token_rewards, values * mask, mask, gamma, lam)
    rollouts.extras["returns"] = returns
    return masked_whiten(advantages, mask) if whiten else advantages
