"""PPO's GAE advantage: outcome token rewards, generalised advantage estimation over valid tokens, batch whitening.

The GAE recursion is shared with T-PPO's extended GAE (:mod:`policylab.algo.advantages.extended_gae`); the
critic is the value head of the ``t_ppo`` objective (:mod:`policylab.annotate.critics`), which provides V(s_t) as
the field ``critic_values``. With ``truncated_as_window: false`` that objective treats every response as
finished, which is plain PPO (recipe ``ppo_gae``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.extended_gae import CRITIC_VALUES, gae
from policylab.algo.advantages.group_baselines import masked_whiten, outcome_token_rewards
from policylab.algo.advantages.reductions import sequence_logp
from policylab.registry import register
from policylab.rollouts import Rollouts


def gae_requires(*, kl_coef: float = 0.0, **_) -> tuple[str, ...]:
    return ("rewards", CRITIC_VALUES) + (("behavior_logp", "ref_logp") if kl_coef else ())


@register("advantage", "gae", spec="arXiv:1506.02438 eq. 16 (GAE); arXiv:1707.06347 (PPO)")
@torch.no_grad()
def gae_advantage(rollouts: Rollouts, *, gamma: float = 1.0, lam: float = 1.0, kl_coef: float = 0.0,
                  whiten: bool = True) -> Tensor:
    """PPO's GAE advantages [B,T] (arXiv:1506.02438 eq. 16): A_t = sum_l (gamma·lam)^l delta_{t+l} with
    delta_t = R_t + gamma·V(s_{t+1}) - V(s_t) over valid tokens (verl defaults gamma = lam = 1), then
    batch-whitened (unbiased) unless ``whiten`` is off.

    Every response is terminal: its outcome reward sits on its last valid token (truncated ones included,
    as in verl), minus ``kl_coef``·(log pi_old - log pi_ref) per token when ``kl_coef`` > 0 (KL-in-reward).
    Values come from ``extras["critic_values"]``. Rows whose reward failed (NaN) get 0 and are left out of the
    whitening. For T-PPO's bootstrapped variant of unfinished responses use the ``egae`` advantage.
    """
    if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
        raise ValueError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    if rollouts.rewards is None:
        raise ValueError("gae needs rollouts.rewards; run the reward stage first")
    mask = rollouts.completion_mask.float() * (~torch.isnan(rollouts.rewards.float()))[:, None]
    if CRITIC_VALUES not in rollouts.extras:
        raise ValueError(f"gae needs critic values [B,T] in rollouts.extras[{CRITIC_VALUES!r}]; the t_ppo objective's "
                         "critic provides them")
    values = rollouts.extras[CRITIC_VALUES].float()
    if values.shape != mask.shape:
        raise ValueError(f"gae: extras[{CRITIC_VALUES!r}] has shape {tuple(values.shape)}, completion_mask {tuple(mask.shape)}")
    token_rewards = outcome_token_rewards(rollouts)
    if kl_coef:
        if rollouts.ref_logp is None:
            raise ValueError("gae with kl_coef > 0 needs old (or behaviour) and reference log-probs")
        old = sequence_logp(rollouts)
        token_rewards = token_rewards - kl_coef * (old - rollouts.ref_logp) * mask
    advantages, _ = gae(token_rewards * mask, values * mask, mask, gamma=gamma, lam=lam)
    return masked_whiten(advantages, mask) if whiten else advantages


gae_advantage.requires = gae_requires
