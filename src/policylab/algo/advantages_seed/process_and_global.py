"""Advantages beyond one scalar per response: ReNorm step rewards (B9) and COPO's global advantage (B11).

COPO also registers its loss blend (objective "copo"), because B11 mixes two clipped surrogates per token.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from policylab.algo.advantages import dr_grpo_advantage, grpo_advantage
from policylab.algo.advantages_seed.common import group_sum, rewards_of
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.algo.objectives import clipped_surrogate, masked_mean, ratio_metrics, token_log_ratio
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

# --------------------------------------------------------------------------------------------------
# B9 ReNorm

STEP_INDEX = "step_index"  # [B,T] long: the step each completion token belongs to, -1 = none (tool/observation)
STEP_REWARDS = "step_rewards"  # [B,S] float: process reward p_k in [0,1] of step k, NaN = not scored


def renorm_step_rewards(process: Tensor, outcome: Tensor) -> Tensor:
    """B9 ReNorm: r~_k = p_k + o - 1 (success steps in [0,1], failed ones in [-1,0]); a missing p_k counts as o."""
    o = outcome.double()[:, None].expand_as(process)
    p = torch.where(torch.isnan(process), o, process.double())
    return p + o - 1


def renorm_step_advantages(step_values: Tensor, present: Tensor, group: Tensor, *, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """B9: A_k = (r~_k - m_g)/(s_g + eps) over all present steps of all trajectories of group g [B,S].

    m_g, s_g: mean and unbiased std of the group's step values (``scale=False``: mean-centre only);
    a group with a single step in total gets 0.
    """
    idx, k = group_index(group)
    rows = idx[:, None].expand_as(step_values)[present]
    values = step_values[present].double()
    count = group_sum(torch.ones_like(values), rows, k)
    mean = group_sum(values, rows, k) / count.clamp(min=1)
    var = group_sum((values - mean[rows]) ** 2, rows, k) / (count - 1).clamp(min=1)
    centred = values - mean[rows]
    adv_values = centred / (var[rows].sqrt() + eps) if scale else centred
    adv_values = torch.where(count[rows] > 1, adv_values, torch.zeros_like(adv_values))
    out = torch.zeros_like(step_values, dtype=torch.float64)
    out[present] = adv_values
    return out.float()


@register("advantage", "renorm", spec="advantages_rewards.md B9 (reconstructed)")
@torch.no_grad()
def renorm_advantage(rollouts: Rollouts, *, scale: bool = True, eps: float = 1e-6, success_threshold: float = 0.5) -> Tensor:
    """ReNorm / PPR (B9, reconstructed): token advantages [B,T] from step rewards normalised over the group.

    Reads ``extras["step_index"]`` [B,T] (-1 off-step) and ``extras["step_rewards"]`` [B,S] (PRM scores,
    NaN = unscored), written by the agent loop or a judge. The outcome o = 1[reward > success_threshold].
    Without step annotations each completion is one step with p := o (r~ = 2o - 1), which reduces to GRPO
    on the outcome. Failed (NaN reward) trajectories get 0. Our choices: the unbiased group std over steps,
    the threshold, the one-step fallback.
    """
    r = rewards_of(rollouts, "renorm")
    failed = torch.isnan(r)
    outcome = (nan_to_zero(r) > success_threshold).double()
    mask = rollouts.completion_mask > 0
    if STEP_INDEX in rollouts.extras or STEP_REWARDS in rollouts.extras:
        if STEP_INDEX not in rollouts.extras or STEP_REWARDS not in rollouts.extras:
            raise ValueError("renorm needs both extras['step_index'] [B,T] and extras['step_rewards'] [B,S]")
        step_index = rollouts.extras[STEP_INDEX].long()
        process = rollouts.extras[STEP_REWARDS].float()
    else:
        step_index = torch.where(mask, 0, -1)
        process = torch.full((rollouts.batch_size, 1), float("nan"))
    if step_index.shape != mask.shape or process.shape[0] != rollouts.batch_size:
        raise ValueError(f"renorm: step_index {tuple(step_index.shape)} must match the completion mask {tuple(mask.shape)} "
                         f"and step_rewards {tuple(process.shape)} must have {rollouts.batch_size} rows")
    num_steps = process.shape[1]
    if step_index.numel() and int(step_index.max()) >= num_steps:
        raise ValueError(f"renorm: step_index refers to step {int(step_index.max())} but step_rewards has {num_steps} columns")
    on_step = mask & (step_index >= 0)
    present = torch.zeros(rollouts.batch_size, num_steps, dtype=torch.bool)
    present[on_step.nonzero()[:, 0], step_index[on_step]] = True
    present &= ~failed[:, None]
    step_adv = renorm_step_advantages(renorm_step_rewards(process, outcome), present, rollouts.group, scale=scale, eps=eps)
    token_adv = step_adv.gather(1, step_index.clamp(min=0))
    return torch.where(on_step & ~failed[:, None], token_adv, torch.zeros_like(token_adv))


# --------------------------------------------------------------------------------------------------
# B11 COPO

ANSWERS = "answers"  # optional extras: list[str | None] [B] of extracted final answers (e.g. from the verifier)
LOCAL_ADV, GLOBAL_ADV, LOCAL_WEIGHT = "copo/local_advantage", "copo/global_advantage", "copo/local_weight"
COPO_MODES = ("soft-with-forced", "no-global", "only-global", "only-soft", "only-forced", "soft-with-zero")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str, how: str) -> str | None:
    """Final answer used to count identical answers: "last_number", "boxed" (last \\boxed{...}) or "text"."""
    if how == "text":
        return text.strip()
    if how == "last_number":
        found = _NUMBER.findall(text.replace(",", ""))
        return found[-1] if found else None
    if how == "boxed":
        start = text.rfind("\\boxed{")
        if start < 0:
            return None
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        return None
    raise ValueError(f"copo answer_from must be 'last_number', 'boxed' or 'text', got {how!r}")


def answer_entropy_bits(answers: list, group: Tensor) -> Tensor:
    """[B] H_g = -sum_a p_a log2 p_a over identical answer strings in each row's group (None is one bucket)."""
    idx, k = group_index(group)
    out = torch.zeros(k, dtype=torch.float64)
    for g in range(k):
        members = [answers[i] for i in (idx == g).nonzero().flatten().tolist()]
        counts = {}
        for a in members:
            counts[a] = counts.get(a, 0) + 1
        out[g] = -sum(c / len(members) * math.log2(c / len(members)) for c in counts.values())
    return out[idx]


def copo_global_advantages(rewards: Tensor, group: Tensor, entropy_bits: Tensor, *, reward_coef: bool = False,
                           eps: float = 1e-6) -> Tensor:
    """B11: g_q = mean_g(r)·c_q (c_q = 1 - lambda_G H_g if ``reward_coef``, lambda_G = (1 - 1/G)/log2 G, c = 1 for
    G = 1), then A^glob = (g_q - mean_q g)/(unbiased std_q g + eps) across prompts; one prompt -> 0."""
    idx, k = group_index(group)
    valid = ~torch.isnan(rewards)
    size = group_sum(torch.ones_like(rewards), idx, k)
    mean = group_sum(nan_to_zero(rewards), idx, k) / group_sum(valid.double(), idx, k).clamp(min=1)
    entropy = torch.zeros(k, dtype=torch.float64).index_put_((idx,), entropy_bits.double())
    if reward_coef:
        lam = torch.where(size > 1, (1 - 1 / size) / torch.log2(size.clamp(min=2)), torch.zeros_like(size))
        mean = mean * (1 - lam * entropy)
    if k < 2:
        return torch.zeros_like(rewards)
    glob = (mean - mean.mean()) / (mean.std() + eps)
    return glob[idx].float()


def copo_local_weight(entropy_bits: Tensor, local_adv: Tensor, rewards: Tensor, *, mode: str, sharpness: float,
                      threshold: float) -> Tensor:
    """B11 blend weight w of the local loss: sigmoid(k(H_g - b)), forced or zeroed per ``mode`` (see COPO_MODES)."""
    soft = torch.sigmoid(sharpness * (entropy_bits.double() - threshold)).float()
    nonzero_local = (local_adv != 0).float()
    weights = {
        "soft-with-forced": lambda: soft * nonzero_local,
        "no-global": lambda: torch.ones_like(soft),
        "only-global": lambda: torch.zeros_like(soft),
        "only-soft": lambda: soft,
        "only-forced": lambda: nonzero_local,
        "soft-with-zero": lambda: soft * (nan_to_zero(rewards) != 0).float(),
    }
    if mode not in weights:
        raise ValueError(f"copo mode must be one of {COPO_MODES}, got {mode!r}")
    return weights[mode]()


@register("advantage", "copo", spec="advantages_rewards.md B11")
@torch.no_grad()
def copo_advantage(rollouts: Rollouts, *, mode: str = "soft-with-forced", sharpness: float = 20.0, entropy_threshold: float = 0.5,
                   reward_coef: bool = False, scale_by_std: bool = True, answer_from: str = "last_number",
                   eps: float = 1e-6) -> Tensor:
    """COPO (B11): w·A^loc + (1 - w)·A^glob, writing both parts and w to extras for the "copo" objective.

    A^loc is GRPO (mean-only when ``scale_by_std`` is off); H_g counts identical final answers, taken from
    ``extras["answers"]`` when present, else extracted from the completions (``answer_from``). The blended
    advantage equals the spec's loss blend on-policy; with clipping (several updates per batch) use the
    "copo" objective, which blends the two clipped surrogates instead.
    """
    r = rewards_of(rollouts, "copo")
    local = grpo_advantage(rollouts, eps=eps) if scale_by_std else dr_grpo_advantage(rollouts)
    answers = rollouts.extras.get(ANSWERS)
    if answers is None:
        answers = [extract_answer(c, answer_from) for c in rollouts.completions]
    if len(answers) != rollouts.batch_size:
        raise ValueError(f"copo needs one answer per row: got {len(answers)} for {rollouts.batch_size} rows "
                         "(fill rollouts.completions or extras['answers'])")
    entropy = answer_entropy_bits(list(answers), rollouts.group)
    glob = torch.where(torch.isnan(r), torch.zeros_like(r),
                       copo_global_advantages(r, rollouts.group, entropy, reward_coef=reward_coef, eps=eps))
    weight = copo_local_weight(entropy, local, r, mode=mode, sharpness=sharpness, threshold=entropy_threshold)
    rollouts.extras.update({LOCAL_ADV: local, GLOBAL_ADV: glob, LOCAL_WEIGHT: weight})
    return weight * local + (1 - weight) * glob


@register("objective", "copo", spec="advantages_rewards.md B11 (per-token loss blend)")
def copo_loss(out: PolicyOutputs, batch: Rollouts, *, eps_low: float = 0.2, eps_high: float = 0.2,
              dual_clip_c: float | None = None) -> tuple[Tensor, dict]:
    """l = (1 - w)·l_PPO(A^glob) + w·l_PPO(A^loc) with one ratio, clip range and dual clip (B11).

    Reads the parts the "copo" advantage wrote to extras; without them (another advantage) it is PPO-clip
    on the batch advantages. On-policy it equals REINFORCE with the blended advantage.
    """
    mask = batch.completion_mask
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    metrics = ratio_metrics(ratio, log_ratio, mask)
    if not all(key in batch.extras for key in (LOCAL_ADV, GLOBAL_ADV, LOCAL_WEIGHT)):
        loss, clipped, _ = clipped_surrogate(ratio, batch.seq_advantages(), eps_low, eps_high, dual_clip_c)
        metrics["clipfrac"] = masked_mean(clipped.float(), mask)
        return loss, metrics
    w = batch.extras[LOCAL_WEIGHT].float()[:, None]
    local = batch.extras[LOCAL_ADV].float()[:, None] * mask
    glob = batch.extras[GLOBAL_ADV].float()[:, None] * mask
    local_loss, local_clipped, _ = clipped_surrogate(ratio, local, eps_low, eps_high, dual_clip_c)
    global_loss, global_clipped, _ = clipped_surrogate(ratio, glob, eps_low, eps_high, dual_clip_c)
    metrics["clipfrac"] = masked_mean(local_clipped.float(), mask)
    metrics["copo/global_clipfrac"] = masked_mean(global_clipped.float(), mask)
    metrics["copo/local_weight"] = masked_mean(w.expand_as(mask), mask)
    return (1 - w) * global_loss + w * local_loss, metrics
