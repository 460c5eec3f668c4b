"""PPO with a GAE critic (advantages_rewards.md A6): outcome token rewards, GAE over valid tokens, batch whitening.

The GAE recursion and the clipped value loss are the shared pure functions of :mod:`policylab.algo.value`;
the critic is the value head the ``t_ppo`` objective owns and trains (its ``prepare`` writes V(s_t) to
``rollouts.extras["value/values"]``). With ``truncated_as_window: false`` that objective treats every response
as finished, which is A6's PPO (recipe ``ppo_gae``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages import masked_whiten, outcome_token_rewards
from policylab.algo.advantages_seed.common import require_extra, sequence_logp
from policylab.algo.value import gae
from policylab.registry import register
from policylab.rollouts import Rollouts

CRITIC_VALUES = "value/values"  # [B,T] V(s_t) at collection time, written by the critic's prepare hook


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """A6 metric: 1 - Var(Ret - V) / Var(Ret) over valid tokens; 0 when the returns have no variance."""
    valid = mask > 0
    ret, err = returns[valid], (returns - values)[valid]
    if ret.numel() < 2 or ret.var() == 0:
        return torch.tensor(0.0)
    return 1 - err.var() / ret.var()


@register("advantage", "gae", spec="advantages_rewards.md A6")
@torch.no_grad()
def gae_advantage(rollouts: Rollouts, *, gamma: float = 1.0, lam: float = 1.0, kl_coef: float = 0.0, whiten: bool = True,
                  values_key: str = CRITIC_VALUES) -> Tensor:
    """PPO GAE advantages [B,T] (A6; verl defaults gamma = lam = 1), batch-whitened (unbiased) unless ``whiten`` is off.

    Every response is terminal: its outcome reward sits on its last valid token (truncated ones included,
    as in verl), minus ``kl_coef``·(log pi_old - log pi_ref) per token when ``kl_coef`` > 0 (KL-in-reward).
    Values come from ``extras[values_key]``. Rows whose reward failed (NaN) get 0 and are left out of the
    whitening. For T-PPO's bootstrapped variant of unfinished responses use the ``egae`` advantage.
    """
    if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
        raise ValueError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    if rollouts.rewards is None:
        raise ValueError("gae needs rollouts.rewards; run the reward stage first")
    mask = rollouts.completion_mask.float() * (~torch.isnan(rollouts.rewards.float()))[:, None]
    values = require_extra(rollouts, values_key, "gae", "critic values [B,T]; the t_ppo objective's prepare writes them").float()
    if values.shape != mask.shape:
        raise ValueError(f"gae: extras[{values_key!r}] has shape {tuple(values.shape)}, completion_mask {tuple(mask.shape)}")
    token_rewards = outcome_token_rewards(rollouts)
    if kl_coef:
        old = sequence_logp(rollouts)
        if old is None or rollouts.ref_logp is None:
            raise ValueError("gae with kl_coef > 0 needs old (or behaviour) and reference log-probs")
        token_rewards = token_rewards - kl_coef * (old - rollouts.ref_logp) * mask
    advantages, _ = gae(token_rewards * mask, values * mask, mask, gamma=gamma, lam=lam)
    return masked_whiten(advantages, mask) if whiten else advantages
