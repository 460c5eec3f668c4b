"""Advantages reweighted per group by difficulty or rollout utility: A-GRAE (accuracy curriculum), DGPO
(MAD-normalised, difficulty-weighted questions), ADORA (length-based group utility), TMN-Reweight (task-level
scale and pass-rate weights)."""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.group_baselines import dr_grpo_advantage, grpo_advantage, rloo_advantage
from policylab.algo.advantages.reductions import group_max, group_means, group_sum, rewards_of
from policylab.algo.group_stats import group_index, group_mean_std, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts


# --------------------------------------------------------------------------------------------------
# B4 A-GRAE


def agrae_transform(adv_hat: Tensor, p_row: Tensor, batch_acc: float, *, alpha_pos: float = 1.0, eps: float = 1e-6) -> Tensor:
    """B4: A = (1-P)·0.5·Â/(1 - sqrt p + eps) + P·0.5·Â/(sqrt p + eps), then A > 0 is scaled by min(1, P/alpha_pos).

    Low batch accuracy P favours easy groups (large p), high P hard ones; positives shrink while P is low.
    """
    root = p_row.clamp(0, 1).sqrt()
    hard_focus = 0.5 * adv_hat / (root + eps)
    easy_focus = 0.5 * adv_hat / (1 - root + eps)
    adv = (1 - batch_acc) * easy_focus + batch_acc * hard_focus
    return torch.where(adv > 0, adv * min(1.0, batch_acc / alpha_pos), adv)


@register("advantage", "a_grae", spec="arXiv:2602.05548 (A-GRAE)", requires=("rewards",), tags=("skip:A-SHIFT",))
@torch.no_grad()
def a_grae_advantage(rollouts: Rollouts, *, alpha_pos: float = 1.0, eps: float = 1e-6, scale_by_std: bool = True,
                     enable_agrae: bool = True) -> Tensor:
    """A-GRAE (arXiv:2602.05548): the GRPO advantage Â reweighted by group accuracy p_g = mu_g and batch accuracy
    P = mean_g p_g, A = (1-P)·0.5·Â/(1 - sqrt p_g) + P·0.5·Â/sqrt p_g (easy groups first, hard ones later), with
    positive advantages scaled by min(1, P/alpha_pos).

    Rewards must lie in [0, 1] (p_g is an accuracy, so a reward offset is not neutral: tagged skip:A-SHIFT).
    ``enable_agrae`` = the intended always-on behaviour (the released flag is
    only true at step 0; False gives plain GRPO). Singleton groups get 0 (our guard: their "accuracy" is
    one sample and sqrt(p) in {0, 1} would blow up the verl singleton advantage r/(1+eps)).
    """
    if alpha_pos <= 0:
        raise ValueError(f"a_grae alpha_pos must be > 0, got {alpha_pos}")
    adv_hat = grpo_advantage(rollouts, eps=eps) if scale_by_std else dr_grpo_advantage(rollouts)
    if not enable_agrae:
        return adv_hat
    r = rewards_of(rollouts, "a_grae")
    p_row, count, idx = group_means(r, rollouts.group)
    finite = r[~torch.isnan(r)]
    if finite.numel() and (finite.min() < 0 or finite.max() > 1):
        raise ValueError("a_grae needs rewards in [0, 1] (group mean = accuracy); rescale the reward or use grpo")
    per_group = torch.zeros(int(idx.max()) + 1 if idx.numel() else 0, dtype=torch.float64).index_put_((idx,), p_row)
    has_valid = group_sum((count > 0).double(), idx, per_group.numel()) > 0
    batch_acc = float(per_group[has_valid].mean()) if has_valid.any() else 0.0
    adv = agrae_transform(adv_hat.double(), p_row, batch_acc, alpha_pos=alpha_pos, eps=eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).float()


# --------------------------------------------------------------------------------------------------
# B5 DGPO


def dgae_advantage(rewards: Tensor, group: Tensor, *, eps: float = 1e-4) -> Tensor:
    """B5 DGAE: A_i = G·d_i / (sum_j |d_j| + eps), d = r - mu_g, so sum |A| = G per group (MAD scaling).

    G counts the group's non-NaN rewards; singletons (sigma undefined) are invalid and get 0.
    """
    mean, count, idx = group_means(rewards, group)
    d = nan_to_zero(rewards.double() - mean)
    spread = group_sum(d.abs(), idx, int(idx.max()) + 1 if idx.numel() else 0)[idx]
    adv = count * d / (spread + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).float()


def difficulty_weights(accuracy: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """B5 DQW over groups [K]: lambda = |V|·softmax_V(-acc/T) on valid groups, 1 elsewhere; acc 0 counts as 1."""
    acc = torch.where(accuracy == 0, torch.ones_like(accuracy), accuracy)
    weights = torch.ones_like(acc)
    if valid.any():
        weights[valid] = int(valid.sum()) * torch.softmax(-acc[valid] / temperature, dim=0)
    return weights


@register("advantage", "dgpo", spec="arXiv:2601.20614 (DGAE + DQW)", requires=("rewards", "reward_components"))
@torch.no_grad()
def dgpo_advantage(rollouts: Rollouts, *, temperature: float = 2.0, dqw: bool = True, balance_tokens: bool = True,
                   accuracy_component: str = "accuracy", eps: float = 1e-4) -> Tensor:
    """DGPO (arXiv:2601.20614): DGAE advantages A_i = G·d_i / sum_j |d_j| (d = r - mu_g: mean-absolute-deviation
    scaling) times the DQW question weight lambda_g = |V|·softmax(-acc_g / T) over valid groups.

    Valid groups: unbiased std of the total reward > 0 (and >= 2 members). acc_g = group mean of the
    ``accuracy_component`` reward (the total reward when that component is absent).
    ``balance_tokens`` realises DGPO's loss normaliser (token sum over all groups / tokens of valid groups
    only) by multiplying every advantage by N_tok(batch) / N_tok(valid groups): exact with token-mean
    aggregation over one mini-batch and an objective that is positively homogeneous in A (PPO-clip,
    REINFORCE); invalid groups have A = 0 so their tokens add nothing to the sum.
    """
    if temperature <= 0:
        raise ValueError(f"dgpo temperature must be > 0, got {temperature}")
    r = rewards_of(rollouts, "dgpo")
    adv = dgae_advantage(r, rollouts.group, eps=eps).double()
    idx, k = group_index(rollouts.group)
    _, std, count = group_mean_std(r, rollouts.group)
    valid_row = (count > 1) & (std > 0)
    valid = group_sum(valid_row.double(), idx, k) > 0
    if dqw:
        acc_source = rollouts.reward_components.get(accuracy_component, r).float()
        acc_row, _, _ = group_means(acc_source, rollouts.group)
        acc = torch.zeros(k, dtype=torch.float64).index_put_((idx,), acc_row)
        adv = adv * difficulty_weights(acc, valid, temperature)[idx]
    if balance_tokens:
        lengths = rollouts.lengths.double()
        valid_tokens = lengths[valid[idx]].sum()
        if valid_tokens > 0:
            adv = adv * lengths.sum() / valid_tokens
    return adv.float()


# --------------------------------------------------------------------------------------------------
# B7 ADORA


def adora_group_weights(rewards: Tensor, group: Tensor, lengths: Tensor, truncated: Tensor, *, lam: float = 0.1,
                        correct_threshold: float = 0.5, variant: str = "llm") -> Tensor:
    """B7: per-row weight w_g: 1 if max length of correct > mean length of non-truncated incorrect, else lam.

    "llm" (verl): an empty correct set has max -inf, an empty incorrect set mean -inf (so w = 1 when every
    incorrect rollout was truncated). "vlm" (OpenRLHF): no correct rollout -> w = 1; no incorrect -> mean +inf
    -> w = lam. ``lam`` > 1 is the "amplify" mode (reconstructed): advantageous groups get lam, others 1.
    """
    if variant not in ("llm", "vlm"):
        raise ValueError(f"adora variant must be 'llm' or 'vlm', got {variant!r}")
    idx, k = group_index(group)
    failed = torch.isnan(rewards)
    correct = ~failed & (rewards > correct_threshold)
    wrong = ~failed & (rewards <= correct_threshold) & ~truncated
    lengths = lengths.double()
    max_correct = group_max(torch.where(correct, lengths, torch.full_like(lengths, float("-inf"))), idx, k)
    n_wrong = group_sum(wrong.double(), idx, k)
    mean_wrong = group_sum(torch.where(wrong, lengths, torch.zeros_like(lengths)), idx, k) / n_wrong.clamp(min=1)
    empty_wrong = float("-inf") if variant == "llm" else float("inf")
    mean_wrong = torch.where(n_wrong > 0, mean_wrong, torch.full_like(mean_wrong, empty_wrong))
    advantageous = max_correct > mean_wrong
    if variant == "vlm":
        advantageous |= group_sum(correct.double(), idx, k) == 0
    if lam > 1:
        weights = torch.where(advantageous, torch.full_like(mean_wrong, lam), torch.ones_like(mean_wrong))
    else:
        weights = torch.where(advantageous, torch.ones_like(mean_wrong), torch.full_like(mean_wrong, lam))
    return weights[idx].float()


@register("advantage", "adora", spec="arXiv:2602.10019 (ADORA)", requires=("rewards", "truncated"))
@torch.no_grad()
def adora_advantage(rollouts: Rollouts, *, lam: float = 0.1, correct_threshold: float = 0.5, truncation_length: int = 0,
                    variant: str = "llm", base: str = "grpo", eps: float = 1e-6) -> Tensor:
    """ADORA (arXiv:2602.10019): the base advantage (GRPO by default; "rloo" or "dr_grpo") times the group weight
    w_g = 1 when the longest correct rollout is longer than the mean non-truncated incorrect one (an
    "advantageous" group), else lam.

    An incorrect rollout counts as truncated when ``rollouts.truncated`` says so or, if
    ``truncation_length`` > 0 (the spec's L_trunc, slightly below the max response length), when it has at
    least that many trained tokens. ``correct_threshold`` is tau_c (0.5 for 0/1 rewards).
    """
    if lam <= 0:
        raise ValueError(f"adora lam must be > 0, got {lam}")
    bases = {"grpo": lambda: grpo_advantage(rollouts, eps=eps), "rloo": lambda: rloo_advantage(rollouts),
             "dr_grpo": lambda: dr_grpo_advantage(rollouts)}
    if base not in bases:
        raise ValueError(f"adora base must be one of {sorted(bases)}, got {base!r}")
    r = rewards_of(rollouts, "adora")
    lengths = rollouts.lengths
    truncated = rollouts.truncated.bool()
    if truncation_length > 0:
        truncated = truncated | (lengths >= truncation_length)
    weights = adora_group_weights(r, rollouts.group, lengths, truncated, lam=lam,
                                  correct_threshold=correct_threshold, variant=variant)
    return bases[base]() * weights


# --------------------------------------------------------------------------------------------------
# B8 TMN-Reweight


def task_ids_of(rollouts: Rollouts, task_key: str, default_task: str | None) -> Tensor:
    """[B] dense task ids from rows[i][task_key]; a missing id is an error unless ``default_task`` is set."""
    names = []
    for i in range(rollouts.batch_size):
        row = rollouts.rows[i] if i < len(rollouts.rows) else {}
        name = row.get(task_key, default_task)
        if name is None:
            raise ValueError(f"tmn_reweight: row {i} has no task id {task_key!r} (set default_task for single-task runs)")
        names.append(str(name))
    order = {n: j for j, n in enumerate(sorted(set(names)))}
    return torch.tensor([order[n] for n in names], dtype=torch.long)


def tmn_reweight_advantages(rewards: Tensor, group: Tensor, task: Tensor, *, scale_by_task: bool = True,
                            difficulty_reweight: bool = True, gamma: float = 1.0, smooth_alpha: float = 0.8,
                            eps: float = 1e-6) -> Tensor:
    """B8: A_i = (r_i - mu_u)/(s_m + eps), s_m = sqrt(mean over the task's prompts of v_u), then pass-rate weights.

    mu_u, v_u: prompt mean and unbiased variance (singleton: 0 and 1). Reweighting: mu_m = mean_u mu_u over the
    task; smoothed mu~_u = alpha mu_u + (1-alpha) mu_m (singleton: mu_m); pass rate pi_u = mean 1[r > mu~_u];
    A *= exp(gamma(0.5 - pi_u)) where r > mu_u, else exp(gamma(pi_u - 0.5)).
    """
    mean, std, count = group_mean_std(rewards, group)
    mean, var = mean.double(), std.double() ** 2
    pidx, kp = group_index(group)
    prompt_task = torch.zeros(kp, dtype=torch.long).index_put_((pidx,), task)
    prompt_mean = torch.zeros(kp, dtype=torch.float64).index_put_((pidx,), mean)
    prompt_var = torch.zeros(kp, dtype=torch.float64).index_put_((pidx,), var)
    prompt_single = torch.zeros(kp, dtype=torch.bool).index_put_((pidx,), count <= 1)
    km = int(prompt_task.max()) + 1 if kp else 0
    prompts_per_task = group_sum(torch.ones(kp), prompt_task, km)
    task_scale = (group_sum(prompt_var, prompt_task, km) / prompts_per_task.clamp(min=1)).sqrt()
    centred = rewards.double() - mean
    adv = centred / (task_scale[task] + eps) if scale_by_task else centred
    if difficulty_reweight:
        task_mean = group_sum(prompt_mean, prompt_task, km) / prompts_per_task.clamp(min=1)
        smoothed = torch.where(prompt_single, task_mean[prompt_task],
                               smooth_alpha * prompt_mean + (1 - smooth_alpha) * task_mean[prompt_task])
        valid = ~torch.isnan(rewards)
        passed = valid & (rewards.double() > smoothed[pidx])
        pass_rate = group_sum(passed.double(), pidx, kp) / group_sum(valid.double(), pidx, kp).clamp(min=1)
        up, down = torch.exp(gamma * (0.5 - pass_rate)), torch.exp(gamma * (pass_rate - 0.5))
        adv = adv * torch.where(rewards.double() > mean, up[pidx], down[pidx])
    return nan_to_zero(adv).float()


@register("advantage", "tmn_reweight", spec="arXiv:2605.19577 (GoLongRL TMN-Reweight)", requires=("rewards", "rows"))
@torch.no_grad()
def tmn_reweight_advantage(rollouts: Rollouts, *, task_key: str = "task", default_task: str | None = None,
                           scale_by_task: bool = True, difficulty_reweight: bool = True, gamma: float = 1.0,
                           smooth_alpha: float = 0.8, eps: float = 1e-6) -> Tensor:
    """TMN-Reweight (GoLongRL, arXiv:2605.19577): prompt-centred advantages scaled by the task's spread,
    A_i = (r_i - mu_u)/s_m with s_m = sqrt(mean over the task's prompts of var_u), times pass-rate weights
    exp(±gamma(0.5 - pi_u)).

    The task of row i is rows[i][task_key]; ``default_task`` names the task of rows without one (single-task
    runs), otherwise a missing id is an error as the spec requires. ``scale_by_task`` = norm_adv_by_task_scale.
    """
    task = task_ids_of(rollouts, task_key, default_task)
    return tmn_reweight_advantages(rewards_of(rollouts, "tmn_reweight"), rollouts.group, task,
                                   scale_by_task=scale_by_task, difficulty_reweight=difficulty_reweight,
                                   gamma=gamma, smooth_alpha=smooth_alpha, eps=eps)
