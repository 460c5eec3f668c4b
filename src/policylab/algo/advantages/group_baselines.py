"""Group-baseline outcome advantages: GRPO, Dr. GRPO, RLOO, REINFORCE++ (and its group baseline), LitePPO,
GPG's bias-corrected and MaxRL's mean-normalised baselines, and ReMax's baseline subtraction; plus the whitening /
return helpers other estimators share.

Each estimator maps ``rollouts.rewards`` [B] (NaN = failed reward) and ``rollouts.group`` to advantages [B]
or [B,T]. They run under no_grad; failed rows get advantage 0. ReMax's greedy-generation pass is the
advantage ``remax`` in :mod:`policylab.annotate.greedy_baseline`, which calls :func:`remax_advantage`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import group_means, rewards_of
from policylab.algo.group_stats import group_mean_std, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts

log = logging.getLogger(__name__)


def _rewards(rollouts: Rollouts) -> Tensor:
    return rewards_of(rollouts, "advantage")


def kl_in_reward_requires(*, kl_coef: float = 0.0, **_) -> tuple[str, ...]:
    """Fields of an estimator with an optional KL-in-reward term: the reference and sampling log-probs when on."""
    return ("rewards", "behavior_logp", "ref_logp") if kl_coef else ("rewards",)


@register("advantage", "grpo", spec="arXiv:2402.03300 §4.1.2 (outcome supervision)", requires=("rewards",))
@torch.no_grad()
def grpo_advantage(rollouts: Rollouts, *, eps: float = 1e-6, scale: str = "group") -> Tensor:
    """GRPO (DeepSeekMath, arXiv:2402.03300 §4.1.2): every token of response i gets the group-normalised reward
    A_i = (r_i - mean_g r) / (std_g r + eps), unbiased std; all-equal group -> 0, singleton -> r/(1+eps).

    ``scale``: "group" (A1), "batch" (std over the whole batch, TRL scale_rewards="batch") or "none" (Dr. GRPO).
    """
    r = _rewards(rollouts)
    mean, std, _ = group_mean_std(r, rollouts.group)
    if scale == "group":
        denom = std + eps
    elif scale == "batch":
        denom = _batch_std(r) + eps
    elif scale == "none":
        denom = torch.ones_like(r)
    else:
        raise ValueError(f"grpo scale must be 'group', 'batch' or 'none', got {scale!r}")
    return nan_to_zero((r - mean) / denom)


@register("advantage", "dr_grpo", spec="arXiv:2503.20783 §3.1 (Dr. GRPO)", requires=("rewards",))
@torch.no_grad()
def dr_grpo_advantage(rollouts: Rollouts) -> Tensor:
    """Dr. GRPO (arXiv:2503.20783 §3.1): the group-mean-centred reward A_i = r_i - mean_g r, without the std
    division that biases GRPO by question difficulty; singleton -> r_i."""
    r = _rewards(rollouts)
    mean, _, _ = group_mean_std(r, rollouts.group)
    return nan_to_zero(r - mean)


@register("advantage", "rloo", spec="arXiv:2402.14740 (RLOO estimator)", requires=("rewards",))
@torch.no_grad()
def rloo_advantage(rollouts: Rollouts) -> Tensor:
    """RLOO (arXiv:2402.14740): the reward minus the mean reward of the other G-1 samples of the prompt,
    A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g r); singleton -> r_i."""
    r = _rewards(rollouts)
    mean, _, count = group_mean_std(r, rollouts.group)
    factor = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
    return nan_to_zero(factor * (r - mean))


def trained_mask(rollouts: Rollouts) -> Tensor:
    """completion_mask without the rows whose reward failed (NaN): those rows get advantage 0 and stay
    out of batch statistics such as the whitening mean and variance."""
    valid = ~torch.isnan(_rewards(rollouts))
    return rollouts.completion_mask.float() * valid[:, None]


def masked_whiten(values: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over masked entries, unbiased variance (verl masked_whiten).

    With fewer than two valid entries the variance is undefined: fall back to std 1 and warn
    (advantages_rewards.md A4 edge case).
    """
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    if n < 2:
        log.warning("masked_whiten: fewer than 2 valid tokens, using std 1")
        return (values - mean) * mask
    var = (((values - mean) * mask) ** 2).sum() / (n - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{t'>=t} gamma^(t'-t) R_t' over valid tokens; masked positions pass the return through."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        running = torch.where(m > 0, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def outcome_token_rewards(rollouts: Rollouts) -> Tensor:
    """[B,T] with the sequence reward on each completion's last trained token."""
    mask = rollouts.completion_mask
    r = nan_to_zero(_rewards(rollouts))
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values
    out = torch.zeros_like(mask, dtype=torch.float32)
    has = last >= 0
    out[has.nonzero().flatten(), last[has]] = r[has]
    return out


@register("advantage", "reinforce_pp", spec="arXiv:2501.03262 (REINFORCE++)")
@torch.no_grad()
def reinforce_pp_advantage(rollouts: Rollouts, *, kl_coef: float = 0.0, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (arXiv:2501.03262): token rewards R'_t = R_t - beta*(log pi_old - log pi_ref) (the outcome
    reward on the last token), their discounted returns, whitened over all valid tokens of the batch.

    The KL-in-reward term requires ``ref_logp`` and the sampling log-probs when ``kl_coef`` > 0.
    """
    mask = trained_mask(rollouts)
    token_rewards = outcome_token_rewards(rollouts)
    if kl_coef:
        old = rollouts.old_logp if rollouts.old_logp is not None else rollouts.behavior_logp
        if old is None or rollouts.ref_logp is None:
            raise ValueError("reinforce_pp with kl_coef > 0 needs old and reference log-probs")
        token_rewards = token_rewards - kl_coef * (old - rollouts.ref_logp) * mask
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask)


reinforce_pp_advantage.requires = kl_in_reward_requires


@register("advantage", "reinforce_pp_baseline", spec="arXiv:2501.03262 (REINFORCE++-baseline)", requires=("rewards",))
@torch.no_grad()
def reinforce_pp_baseline_advantage(rollouts: Rollouts) -> Tensor:
    """REINFORCE++-baseline (arXiv:2501.03262): the group-mean-centred reward s_i = r_i - mean_g r on every
    valid token, then whitened over all valid tokens of the batch (token-weighted)."""
    mask = trained_mask(rollouts)
    r = _rewards(rollouts)
    mean, _, _ = group_mean_std(r, rollouts.group)
    centred = nan_to_zero(r - mean)
    return masked_whiten(centred[:, None] * mask, mask)


def _batch_std(r: Tensor) -> Tensor:
    valid = r[~torch.isnan(r)]
    if valid.numel() < 2:
        return torch.tensor(float("nan"))
    return valid.std()


@register("advantage", "lite_ppo", spec="arXiv:2508.08221 (LitePPO: group mean, batch std)", requires=("rewards",))
@torch.no_grad()
def lite_ppo_advantage(rollouts: Rollouts, *, eps: float = 1e-6) -> Tensor:
    """LitePPO (arXiv:2508.08221): centre on the group mean, scale by the whole batch's std,
    A_i = (r_i - mean_g r) / (std_batch r + eps); batch std 0 -> A = 0; batch of 1 -> r_i - mean_g."""
    r = _rewards(rollouts)
    mean, _, _ = group_mean_std(r, rollouts.group)
    std = _batch_std(r)
    centred = r - mean
    if torch.isnan(std):
        return nan_to_zero(centred)
    return nan_to_zero(centred / (std + eps))


def remax_advantage(rewards: Tensor, baseline: Tensor) -> Tensor:
    """ReMax (arXiv:2310.10505): A_i = r_i - b_i with b_i the reward of the greedy completion of prompt i (for
    outcome rewards the same value on every valid token); NaN on either side -> 0."""
    return nan_to_zero(rewards - baseline)


@register("advantage", "gpg", spec="arXiv:2504.02546 §3 (GPG advantage with its bias correction; verl adv_estimator='gpg')",
          requires=("rewards",))
@torch.no_grad()
def gpg_advantage(rollouts: Rollouts, *, scale: str = "none", eps: float = 1e-6) -> Tensor:
    """GPG (Group Policy Gradient, arXiv:2504.02546 §3): the group-mean-centred reward scaled up by the batch's
    share of informative completions, A_i = alpha * (r_i - mean_g r) / F, alpha = B / B_eff, B = rows in the batch,
    B_eff = rows whose centred reward is non-zero (degenerate groups and failed rewards add nothing to the gradient
    but count in its mean, which alpha undoes); F = 1 (``scale="none"``, the paper's default) or the group std.

    Spec choice: B_eff counts non-zero ADVANTAGES (the paper and TRL's GPG); verl divides by the count of non-zero
    raw rewards instead. alpha = 1 when nothing is informative.
    """
    r = _rewards(rollouts)
    mean, std, _ = group_mean_std(r, rollouts.group)
    if scale == "none":
        centred = nan_to_zero(r - mean)
    elif scale == "group":
        centred = nan_to_zero((r - mean) / (std + eps))
    else:
        raise ValueError(f"gpg scale must be 'none' or 'group', got {scale!r}")
    informative = int((centred != 0).sum())
    return centred * (r.numel() / informative if informative else 1.0)


@register("advantage", "maxrl", spec="arXiv:2602.02710 (MaxRL p-normalisation; prime-rl algo 'max_rl', SkyRL 'maxrl')",
          requires=("rewards",), tags=("skip:A-SHIFT",))
@torch.no_grad()
def maxrl_advantage(rollouts: Rollouts) -> Tensor:
    """MaxRL (Maximum Likelihood RL, arXiv:2602.02710): the group-mean-centred reward divided by the group mean,
    A_i = (r_i - p_g) / p_g where p_g > 0 (else r_i - p_g). With binary rewards this is the unbiased estimator of
    grad log p(x), the log pass rate: r_i / K - 1/N summed over the group, times N — hard prompts (small p_g) weigh
    1/p_g more than in GRPO. As prime-rl's max_rl: "reward minus group mean, divided by group mean when positive".

    ``skip:A-SHIFT``: dividing by the mean makes the advantage depend on the rewards' offset (the paper's rewards
    are success indicators). A singleton group gets 0 (its own mean).
    """
    r = _rewards(rollouts)
    mean, _, _ = group_means(r, rollouts.group)
    mean = mean.to(r.dtype)
    centred = r - mean
    return nan_to_zero(torch.where(mean > 0, centred / mean.clamp(min=1e-12), centred))
