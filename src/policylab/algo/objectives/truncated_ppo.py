"""T-PPO's loss (arXiv:2506.15050, Truncated PPO): PPO-clip on the policy plus a clipped value loss that trains
the critic on finished responses only. Pure math on the critic's outputs; the critic (value head, its scoring
pass and optimizer) and the registered ``t_ppo`` objective are in policylab/annotate/critics.py, the extended GAE
it feeds in policylab/algo/advantages/extended_gae.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.extended_gae import CRITIC_RETURNS, CRITIC_VALUES, RESPONSE_FINISHED
from policylab.algo.objectives.policy_gradient import masked_mean, ppo_clip_loss
from policylab.rollouts import PolicyOutputs, Rollouts


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None = 0.5) -> tuple[Tensor, Tensor]:
    """Per-token 0.5*max((V - Ret)^2, (V_clip - Ret)^2), V_clip = V_old + clip(V - V_old, -c, c) (PPO's value clip, verl).

    Returns (loss [B,T], clipped [B,T] bool: where the clipped term is the larger). ``clip=None``: unclipped.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def tppo_loss(out: PolicyOutputs, batch: Rollouts, values: Tensor | None, *, eps_low: float = 0.2, eps_high: float = 0.2,
              dual_clip_c: float | None = None, value_coef: float = 1.0, value_clip: float | None = 0.5) -> tuple[Tensor, dict]:
    """l = PPO-clip + value_coef * 0.5*max((V-Ret)^2, (V_clip-Ret)^2) on the tokens of finished responses.

    ``values`` [B,T] is the critic's current V(s_t) (with its graph, so the loss trains it); the collection-time
    estimates and targets come from the batch (``critic_values``, ``critic_returns``, ``response_finished``). Without
    them (or without ``values``) only the policy loss is returned.
    """
    loss, metrics = ppo_clip_loss(out, batch, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
    if values is None or CRITIC_RETURNS not in batch.extras:
        return loss, metrics
    mask = batch.completion_mask
    old_values = batch.extras[CRITIC_VALUES].to(values)
    returns = batch.extras[CRITIC_RETURNS].to(values)
    finished = batch.extras[RESPONSE_FINISHED].to(values)[:, None] * mask
    value_loss, clipped = clipped_value_loss(values, old_values, returns, value_clip)
    loss = loss + value_coef * value_loss * finished
    metrics["value/loss"] = masked_mean(value_loss.detach(), finished)
    metrics["value/clipfrac"] = masked_mean(clipped.float(), finished)
    metrics["value/mean"] = masked_mean(values.detach(), mask)
    metrics["value/finished_frac"] = batch.extras[RESPONSE_FINISHED].float().mean()
    return loss, metrics
