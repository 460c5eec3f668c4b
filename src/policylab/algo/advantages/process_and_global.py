"""Advantages beyond one scalar per response: ReNorm's step-reward normalisation (token advantages from
process rewards) and COPO's global, cross-prompt advantage blended with the local GRPO one.

The "copo" objective (the per-token blend of two clipped surrogates) is in
:mod:`policylab.algo.objectives.consistency_blend`; it requires the three fields the "copo" advantage
provides here.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from policylab.algo.advantages.group_baselines import dr_grpo_advantage, grpo_advantage
from policylab.algo.advantages.reductions import group_sum, rewards_of
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

# --------------------------------------------------------------------------------------------------
# ReNorm (arXiv:2509.25598)


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


def renorm_token_advantages(process: Tensor, outcome: Tensor, step_index: Tensor, mask: Tensor, group: Tensor,
                            failed: Tensor, *, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """Token advantages [B,T] from step annotations: r~_k = p_k + o - 1 per step, normalised over all present
    steps of the group, then spread over each step's tokens.

    ``process`` [B,S]: process reward p_k in [0,1] of step k (NaN = unscored, counts as o); ``outcome`` [B] in
    {0,1}; ``step_index`` [B,T] long: the step of each completion token, -1 = none (tool/observation tokens);
    ``failed`` [B]: rows whose reward failed get 0.
    """
    if step_index.shape != mask.shape or process.shape[0] != mask.shape[0]:
        raise ValueError(f"renorm: step_index {tuple(step_index.shape)} must match the completion mask {tuple(mask.shape)} "
                         f"and step_rewards {tuple(process.shape)} must have {mask.shape[0]} rows")
    num_steps = process.shape[1]
    if step_index.numel() and int(step_index.max()) >= num_steps:
        raise ValueError(f"renorm: step_index refers to step {int(step_index.max())} but step_rewards has {num_steps} columns")
    on_step = mask & (step_index >= 0)
    present = torch.zeros(mask.shape[0], num_steps, dtype=torch.bool)
    present[on_step.nonzero()[:, 0], step_index[on_step]] = True
    present &= ~failed[:, None]
    step_adv = renorm_step_advantages(renorm_step_rewards(process, outcome), present, group, scale=scale, eps=eps)
    token_adv = step_adv.gather(1, step_index.clamp(min=0))
    return torch.where(on_step & ~failed[:, None], token_adv, torch.zeros_like(token_adv))


@register("advantage", "renorm", spec="arXiv:2509.25598 (ReNorm / principle process reward normalisation)",
          requires=("rewards",), tags=("skip:A-SHIFT",))
@torch.no_grad()
def renorm_advantage(rollouts: Rollouts, *, scale: bool = True, eps: float = 1e-6, success_threshold: float = 0.5) -> Tensor:
    """ReNorm / PPR (arXiv:2509.25598, reconstructed): token advantages [B,T] from step rewards r~_k = p_k + o - 1
    (so no step of a failed trajectory outranks a step of a successful one), normalised over all steps of the group.

    The outcome o = 1[reward > success_threshold] is absolute (tagged skip:A-SHIFT). No stage of this library
    annotates steps and their process rewards yet, so each completion is one step with p := o (r~ = 2o - 1),
    which reduces to GRPO on the outcome; :func:`renorm_token_advantages` is the multi-step math for such a
    stage. Failed (NaN reward) trajectories get 0. Our choices: the unbiased group std over steps, the
    threshold, the one-step form.
    """
    r = rewards_of(rollouts, "renorm")
    mask = rollouts.completion_mask > 0
    outcome = (nan_to_zero(r) > success_threshold).double()
    unscored = torch.full((rollouts.batch_size, 1), float("nan"))  # one step per completion, p := o
    return renorm_token_advantages(unscored, outcome, torch.where(mask, 0, -1), mask, rollouts.group, torch.isnan(r),
                                   scale=scale, eps=eps)


# --------------------------------------------------------------------------------------------------
# COPO (arXiv:2508.04138)

LOCAL_ADV = declare_field("copo_local_advantage", per_row=True, shape="[B]", dtype="float", owner="advantage 'copo'",
                          doc="COPO's local (GRPO) advantage A^loc of the row")
GLOBAL_ADV = declare_field("copo_global_advantage", per_row=True, shape="[B]", dtype="float", owner="advantage 'copo'",
                           doc="COPO's global advantage A^glob: the prompt's accuracy normalised across the batch's prompts")
LOCAL_WEIGHT = declare_field("copo_local_weight", per_row=True, shape="[B]", dtype="float", owner="advantage 'copo'",
                             doc="COPO's blend weight w of the local term (sigmoid of the group's answer entropy)")
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


@register("advantage", "copo", spec="arXiv:2508.04138 (consistency-aware global advantage)")
class COPOAdvantage:
    """COPO (arXiv:2508.04138): A = w·A^loc + (1 - w)·A^glob with A^loc the GRPO advantage, A^glob the prompt's
    accuracy normalised across prompts and w = sigmoid(k(H_g - b)) of the group's answer entropy H_g.

    ``annotate`` provides the three parts (``copo_local_advantage``, ``copo_global_advantage``,
    ``copo_local_weight``) for the "copo" objective. A^loc is GRPO (mean-only when ``scale_by_std`` is off);
    H_g counts identical final answers extracted from the completions (``answer_from``). The blended
    advantage equals the spec's loss blend on-policy; with clipping (several updates per batch) use the
    "copo" objective, which blends the two clipped surrogates instead.
    """

    requires = ("rewards", "completions")
    provides = (LOCAL_ADV, GLOBAL_ADV, LOCAL_WEIGHT)

    def __init__(self, mode: str = "soft-with-forced", sharpness: float = 20.0, entropy_threshold: float = 0.5,
                 reward_coef: bool = False, scale_by_std: bool = True, answer_from: str = "last_number", eps: float = 1e-6):
        if mode not in COPO_MODES:
            raise ValueError(f"copo mode must be one of {COPO_MODES}, got {mode!r}")
        extract_answer("", answer_from)  # validates the choice
        self.mode, self.sharpness, self.entropy_threshold = mode, sharpness, entropy_threshold
        self.reward_coef, self.scale_by_std, self.answer_from, self.eps = reward_coef, scale_by_std, answer_from, eps

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx=None) -> dict[str, Tensor]:
        r = rewards_of(rollouts, "copo")
        local = grpo_advantage(rollouts, eps=self.eps) if self.scale_by_std else dr_grpo_advantage(rollouts)
        if len(rollouts.completions) != rollouts.batch_size:
            raise ValueError(f"copo needs one completion text per row to extract answers: got {len(rollouts.completions)} "
                             f"for {rollouts.batch_size} rows")
        answers = [extract_answer(c, self.answer_from) for c in rollouts.completions]
        entropy = answer_entropy_bits(answers, rollouts.group)
        glob = torch.where(torch.isnan(r), torch.zeros_like(r),
                           copo_global_advantages(r, rollouts.group, entropy, reward_coef=self.reward_coef, eps=self.eps))
        weight = copo_local_weight(entropy, local, r, mode=self.mode, sharpness=self.sharpness, threshold=self.entropy_threshold)
        return {LOCAL_ADV.name: local.float(), GLOBAL_ADV.name: glob.float(), LOCAL_WEIGHT.name: weight.float()}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        names = [f.name for f in self.provides]
        parts = ({n: rollouts.extras[n] for n in names} if all(n in rollouts.extras for n in names)
                 else self.annotate(rollouts))
        w = parts[LOCAL_WEIGHT.name]
        return w * parts[LOCAL_ADV.name] + (1 - w) * parts[GLOBAL_ADV.name]
