"""Variance-optimal baselines: OPO's length-weighted group baseline and the Optimal Token Baseline (OTB) with its
tool-integrated variant.

A baseline b minimising the variance of (r - b) * grad log pi is E[r |g|^2] / E[|g|^2] (g the score function).
OPO approximates |g|^2 by the response length (one baseline per group); OTB by the accumulated per-token
score-norm proxy W_t = sum_{j<=t} (1 - 2 pi_j + sum_v pi_j(v)^2), giving one baseline per group and position.
The vocabulary statistic sum_v pi(v)^2 comes from the annotator ``sum_pi_squared`` (policylab/annotate/vocab_moments.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.group_baselines import outcome_token_rewards
from policylab.algo.advantages.reductions import group_sum, rewards_of, sequence_logp
from policylab.algo.group_stats import group_index, nan_to_zero, zero_failed
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

SUM_PI_SQUARED = declare_field(
    "sum_pi_squared", per_row=True, shape="[B,T]", dtype="float", owner="annotator 'sum_pi_squared'",
    doc="sum_v pi_old(v | x, y_<t)^2 at each completion position: the collision probability of the sampling policy").name


def sum_squared_probs(logits: Tensor) -> Tensor:
    """sum_v softmax(logits)_v^2 over the last dimension (the collision probability), computed in float32."""
    return torch.softmax(logits.float(), dim=-1).pow(2).sum(-1)


@register("advantage", "opo", spec="arXiv:2505.23585 §3 (OPO optimal reward baseline; verl adv_estimator='opo')",
          requires=("rewards",))
@torch.no_grad()
def opo_advantage(rollouts: Rollouts) -> Tensor:
    """OPO (On-Policy RL with Optimal reward baseline, arXiv:2505.23585 §3): A_i = r_i - b_g with the
    length-weighted group baseline b_g = sum_j L_j r_j / sum_j L_j (L = trained tokens), the variance-optimal
    baseline when a response's squared gradient norm grows with its length. A singleton group has b = 0 (verl's
    convention, like GRPO's); failed (NaN) rewards are left out of b and get 0.
    """
    r = rewards_of(rollouts, "opo").double()
    valid = ~torch.isnan(r)
    lengths = rollouts.completion_mask.double().sum(-1) * valid
    idx, k = group_index(rollouts.group)
    count = group_sum(valid.double(), idx, k)
    weighted = group_sum(torch.where(valid, lengths * r, torch.zeros_like(r)), idx, k)
    total_len = group_sum(lengths, idx, k)
    plain = group_sum(torch.where(valid, r, torch.zeros_like(r)), idx, k) / count.clamp(min=1)
    baseline = torch.where(total_len > 0, weighted / total_len.clamp(min=1e-12), plain)
    baseline = torch.where(count > 1, baseline, torch.zeros_like(baseline))
    return nan_to_zero(r - baseline[idx]).float()


def token_positions(mask: Tensor, compact: bool) -> Tensor:
    """[B,T] long: the absolute position t, or (``compact``) the index of t among the row's trained tokens."""
    if compact:
        return (mask.cumsum(-1) - 1).clamp(min=0).long()
    return torch.arange(mask.shape[1]).expand_as(mask)


def optimal_token_baseline(returns: Tensor, path_weight: Tensor, mask: Tensor, group: Tensor, *, compact: bool,
                           zero_tail: bool, eps: float = 1e-8) -> Tensor:
    """B[i,t] = sum_j G[j,p] W[j,p] m[j,p] / (sum_j W[j,p] m[j,p] + eps) over the rows j of i's group at the same
    position p (absolute, or compacted over trained tokens); 0 in singleton groups. ``zero_tail``: where one row
    is strictly the longest of its group, its positions past the second-longest get B = 0 (there it would be its
    own return, giving A = 0)."""
    idx, k = group_index(group)
    pos = token_positions(mask, compact)
    width = int(pos.max()) + 1 if pos.numel() else 1
    cell = (idx[:, None] * width + pos).flatten()
    m = mask.double().flatten()
    num = torch.zeros(k * width, dtype=torch.float64).index_add_(0, cell, (returns.double() * path_weight.double()).flatten() * m)
    den = torch.zeros(k * width, dtype=torch.float64).index_add_(0, cell, path_weight.double().flatten() * m)
    baseline = (num / (den + eps))[cell].view_as(mask).double()
    size = torch.bincount(idx, minlength=k)
    baseline = baseline * (size[idx] > 1)[:, None]
    if zero_tail:
        lengths = mask.sum(-1).long()
        for g in range(k):
            rows = (idx == g).nonzero().flatten()
            if len(rows) < 2:
                continue
            top = torch.sort(lengths[rows], descending=True).values
            if top[0] > top[1]:
                longest = rows[lengths[rows] == top[0]][0]
                baseline[longest] = torch.where(pos[longest] >= top[1], 0.0, baseline[longest])
    return baseline


def _otb(rollouts: Rollouts, who: str, compact: bool, zero_tail: bool) -> Tensor:
    mask = rollouts.completion_mask.float()
    pi = torch.exp(sequence_logp(rollouts))
    sum_sq = rollouts.extras.get(SUM_PI_SQUARED)
    if sum_sq is None:
        raise ValueError(f"{who} needs the field {SUM_PI_SQUARED!r} (the annotator 'sum_pi_squared' provides it)")
    # |s_t|^2 = 1 - 2 pi_t + sum_v pi^2 is a squared norm: clamp at 0 against inconsistent inputs
    w = (1.0 - 2.0 * pi + torch.as_tensor(sum_sq).float()).clamp(min=0.0) * mask
    path_weight = w.cumsum(-1)
    rewards_of(rollouts, who)
    returns = outcome_token_rewards(rollouts).flip(-1).cumsum(-1).flip(-1) * mask
    failed = torch.isnan(rollouts.rewards.float())
    keep = mask * (~failed)[:, None]  # failed rows stay out of their group's baseline
    baseline = optimal_token_baseline(returns, path_weight, keep, rollouts.group, compact=compact, zero_tail=zero_tail)
    return zero_failed(((returns - baseline) * keep).float(), rollouts)


@register("advantage", "optimal_token_baseline",
          spec="arXiv:2602.07078 (Optimal Token Baseline; verl adv_estimator='optimal_token_baseline')",
          requires=("rewards", "behavior_logp", SUM_PI_SQUARED))
@torch.no_grad()
def optimal_token_baseline_advantage(rollouts: Rollouts, *, zero_tail: bool = True) -> Tensor:
    """OTB (The Optimal Token Baseline, arXiv:2602.07078): per token A_{i,t} = G_{i,t} - B_t, G the return to go
    (the outcome reward) and B_t = sum_j G_{j,t} W_{j,t} / sum_j W_{j,t} over the group's responses still alive at
    position t, weighted by the realised path energy W_{j,t} = sum_{s<=t} (1 - 2 pi_s + sum_v pi_s(v)^2) — the
    cumulative squared norm of the logit-gradient of log pi along the path (pi_s = the sampled token's probability
    under the sampling policy, from ``behavior_logp``/``old_logp``; sum_v pi^2 from ``sum_pi_squared``).

    Singleton groups get A = G. verl's optional rollout-IS weight on W is not applied (policylab's engines sample
    from the policy being trained). ``zero_tail`` as verl's handle_zero_tail (default on). Advantages are [B,T].
    """
    return _otb(rollouts, "optimal_token_baseline", compact=False, zero_tail=zero_tail)


@register("advantage", "tir_optimal_token_baseline",
          spec="arXiv:2602.07078 (OTB, tool-integrated variant; verl adv_estimator='tir_optimal_token_baseline')",
          requires=("rewards", "behavior_logp", SUM_PI_SQUARED))
@torch.no_grad()
def tir_optimal_token_baseline_advantage(rollouts: Rollouts, *, zero_tail: bool = True) -> Tensor:
    """Tool-integrated OTB (arXiv:2602.07078; verl's multi-turn form): OTB with the baseline indexed by a token's
    position AMONG THE TRAINED TOKENS (mask 1) instead of its absolute position, so tool / observation tokens
    (mask 0) inside a completion do not misalign responses whose tool outputs differ in length. Identical to
    ``optimal_token_baseline`` when every completion's mask is a prefix of ones.
    """
    return _otb(rollouts, "tir_optimal_token_baseline", compact=True, zero_tail=zero_tail)
