"""Generalised advantage estimation over valid tokens, with the bootstrap of unfinished responses (T-PPO's
extended GAE), and the ``egae`` advantage that applies it to a critic's estimates.

Conventions: position t of a [B,T] critic estimate is V(s_t), the state before completion token t; the bootstrap
of an unfinished response is V(s_L), the state after its last token. The critic itself (a value head on the
policy's hidden states, trained by the ``t_ppo`` objective) lives in policylab/annotate/critics.py and provides
the fields named below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.group_baselines import masked_whiten, outcome_token_rewards
from policylab.registry import register
from policylab.rollouts import Rollouts

# fields provided by the t_ppo objective's critic (declared in policylab/annotate/critics.py)
CRITIC_VALUES = "critic_values"  # [B,T] V(s_t) at collection time
CRITIC_BOOTSTRAP = "critic_bootstrap"  # [B] V(s_L) of unfinished responses, 0 for finished ones
RESPONSE_FINISHED = "response_finished"  # [B] bool: the response ended (its reward is final)
CRITIC_RETURNS = "critic_returns"  # [B,T] the critic's regression targets (lambda-returns)


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 1.0,
        bootstrap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (arXiv:1506.02438 eq. 16) over valid tokens, right to left; with
    ``bootstrap`` it is T-PPO's extended GAE (arXiv:2506.15050).

    delta_t = r_t + gamma*V_next - V_t and A_t = delta_t + gamma*lam*A_next, where V_next / A_next belong to the
    next VALID token (masked tokens are skipped, not zeros), and after the last valid token V_next = bootstrap
    (V(s_L) of an unfinished response; 0 / None for a finished one) and A_next = 0.
    Returns (advantages, returns = advantages + values), both zero on masked positions.
    """
    if token_rewards.shape != values.shape or values.shape != mask.shape:
        raise ValueError(f"gae needs rewards, values and mask of one shape, got {tuple(token_rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    batch, length = values.shape
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    if bootstrap is not None:
        next_value = bootstrap.to(values)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        valid = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
    returns = (advantages + values) * (mask > 0)
    return advantages, returns


def finished_token_rewards(rollouts: Rollouts, finished: Tensor) -> Tensor:
    """[B,T] r_t = R on the last valid token of a finished response, 0 elsewhere (an unfinished one has no reward yet)."""
    return outcome_token_rewards(rollouts) * finished.bool().to(rollouts.completion_mask.device)[:, None]


@register("advantage", "egae", spec="arXiv:2506.15050 (T-PPO's extended GAE)",
          requires=("rewards", CRITIC_VALUES, CRITIC_BOOTSTRAP, RESPONSE_FINISHED), tags=("skip:A-SHIFT",))
@torch.no_grad()
def egae_advantage(rollouts: Rollouts, *, gamma: float = 1.0, lam: float = 0.95, whiten: bool = False) -> Tensor:
    """Extended GAE (arXiv:2506.15050, T-PPO; reconstructed from the abstract): GAE over the observed tokens that
    bootstraps an unfinished response from the critic's V(s_L) instead of waiting for its reward.

    Finished rows: r = R on the last token and V(s_L) = 0; unfinished rows: r = 0 and V(s_L) = the critic's
    bootstrap. Reads the critic's estimates (``critic_values``, ``critic_bootstrap``, ``response_finished``, provided
    by the ``t_ppo`` objective's annotate hook). ``whiten`` applies batch whitening (off by default: T-PPO has none).

    Shared test A-SHIFT does not hold: the baseline is the critic's V(s), not a group statistic, so a reward
    offset moves A = R - V until the critic has learned it.
    """
    for key in (CRITIC_VALUES, CRITIC_BOOTSTRAP, RESPONSE_FINISHED):
        if key not in rollouts.extras:
            raise ValueError(f"egae needs the critic's estimates in rollouts.extras[{key!r}]; use it with the t_ppo "
                             "objective, whose annotate hook provides them")
    if rollouts.rewards is None:
        raise ValueError("egae needs rollouts.rewards; run the reward stage first")
    mask = rollouts.completion_mask
    finished = rollouts.extras[RESPONSE_FINISHED].bool()
    rewards = finished_token_rewards(rollouts, finished)
    values = rollouts.extras[CRITIC_VALUES].float()
    bootstrap = rollouts.extras[CRITIC_BOOTSTRAP]
    bootstrap = torch.where(finished, torch.zeros_like(bootstrap), bootstrap).float()
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap=bootstrap)
    return masked_whiten(advantages, mask) if whiten else advantages
