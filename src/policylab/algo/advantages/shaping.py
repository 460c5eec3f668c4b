"""Advantage re-weighting from cheap per-rollout facts: AEM (arXiv:2605.00425), ASPO (arXiv:2508.19201),
GUI-Libra (arXiv:2602.22190).

AEM rescales by group-normalised surprisal, ASPO nudges correct tool-using rollouts by when they first
call a tool, GUI-Libra damps negative advantages by the group's success rate. All start from a
registered base advantage (``base``, default ``grpo``) and never change the sign of a base advantage.
(GUI-G1's difficulty weights are a token_weights component: policylab/algo/token_weights/difficulty.py.)
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from policylab.algo.advantages.base_advantage import BaseAdvantage
from policylab.algo.group_stats import correctness, group_index, group_mean_std, zero_failed
from policylab.registry import register
from policylab.rollouts import Rollouts


def _base(rollouts: Rollouts, base: str, base_params: dict | None, who: str) -> Tensor:
    return BaseAdvantage(base, base_params).sequence(rollouts, who)


# -- AEM (arXiv:2605.00425) ----------------------------------------------------------------------------------------


def aem_weights(surprisal: Tensor, group: Tensor, *, beta: float = 0.5, w_min: float = 0.5, w_max: float = 1.5,
                eps: float = 1e-6) -> Tensor:
    """w_i = clip(1 − β·z_i, w_min, w_max), z = group-standardised surprisal (unbiased std; std 0 or G=1 -> w=1)."""
    mean, std, count = group_mean_std(surprisal, group)
    z = torch.where((count > 1) & (std > 0), (surprisal - mean) / (std + eps), torch.zeros_like(surprisal))
    return (1 - beta * z).clamp(w_min, w_max)


def response_surprisal(logp: Tensor, mask: Tensor) -> Tensor:
    """u_i = −mean_t log π_old(o_t) over the response's trained tokens (0 for empty responses)."""
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@register("advantage", "aem", spec="arXiv:2605.00425 (reconstructed from the abstract)",
          requires=("rewards", "behavior_logp"))
@torch.no_grad()
def aem_advantage(rollouts: Rollouts, *, beta: float = 0.5, w_min: float = 0.5, w_max: float = 1.5, eps: float = 1e-6,
                  base: str = "grpo", base_params: dict | None = None) -> Tensor:
    """AEM (arXiv:2605.00425): A'_i = clip(1 − β·z_i, w_min, w_max)·A_i, z_i = group-normalised mean token NLL
    of the response.

    Confident (low-surprisal) responses get larger |A|, so early negatives raise entropy and later
    positives lower it. Reads π_old from ``old_logp`` or the engine's ``behavior_logp``.
    Reconstructed from the abstract: β = 0.5, w ∈ [0.5, 1.5] are our defaults; response level only
    (the per-turn form waits for the multi-turn engine).
    """
    logp = rollouts.old_logp if rollouts.old_logp is not None else rollouts.behavior_logp
    if logp is None:
        raise ValueError("aem needs π_old log-probs: rollouts.old_logp or rollouts.behavior_logp (the rollout engine's)")
    adv = _base(rollouts, base, base_params, "aem")
    mask = rollouts.completion_mask.float()
    u = response_surprisal(logp.float(), mask)
    return zero_failed(aem_weights(u, rollouts.group, beta=beta, w_min=w_min, w_max=w_max, eps=eps) * adv, rollouts)


# -- ASPO (arXiv:2508.19201) ---------------------------------------------------------------------------------------


def aspo_bonus(adv: Tensor, preference: Tensor, eligible: Tensor, group: Tensor, *, delta: float = 0.5, k: float = 0.5,
               eps: float = 1e-6, sign: float = -1.0) -> Tensor:
    """A'_i = A_i + clip(sign·δ·z_i, −k|A_i|, k|A_i|) for eligible rows, z standardised over the eligible rows
    of each group (unbiased std; fewer than two -> z = 0). sign −1 rewards a *smaller* preference value."""
    out = adv.clone()
    idx, n = group_index(group)
    for g in range(n):
        rows = ((idx == g) & eligible).nonzero().flatten()
        if rows.numel() < 2:
            continue
        values = preference[rows]
        z = (values - values.mean()) / (values.std() + eps)
        cap = k * adv[rows].abs()
        out[rows] = adv[rows] + torch.maximum(torch.minimum(sign * delta * z, cap), -cap)
    return out


def tool_call_facts(rollouts: Rollouts, pattern: str) -> tuple[Tensor, Tensor]:
    """([B] relative position of the first tool call in [0,1] (NaN if none), [B] number of tool calls), found
    as matches of ``pattern`` in the completion text (position as a fraction of its characters)."""
    b = rollouts.batch_size
    regex = re.compile(pattern)
    rel, calls = torch.full((b,), float("nan")), torch.zeros(b)
    for i, text in enumerate(rollouts.completions or [""] * b):
        hits = list(regex.finditer(text))
        if hits:
            rel[i] = hits[0].start() / max(1, len(text))
            calls[i] = len(hits)
    return rel, calls


@register("advantage", "aspo", spec="arXiv:2508.19201 (advantage shaping; reconstructed from the abstract)",
          requires=("rewards", "completions"))
@torch.no_grad()
def aspo_advantage(rollouts: Rollouts, *, delta: float = 0.5, k: float = 0.5, eps: float = 1e-6,
                   preference: str = "early_call", tool_pattern: str = r"<tool_call>|```python",
                   base: str = "grpo", base_params: dict | None = None) -> Tensor:
    """ASPO (arXiv:2508.19201): a behaviour preference enters the advantage, clipped to ±k|A_i| so its sign
    never flips (k < 1).

    For correct rollouts with at least one tool call: ``early_call`` standardises ρ_i = first-call
    position / length within the group and adds clip(−δ·z); ``more_turns`` uses the number of tool calls
    and adds clip(+δ·z). Other rollouts keep A_i. Reconstructed from the abstract: δ = k = 0.5 are ours.
    Without tool calls (e.g. plain arithmetic) nothing is eligible and this equals the base advantage.
    """
    if preference not in ("early_call", "more_turns"):
        raise ValueError(f"aspo preference must be 'early_call' or 'more_turns', got {preference!r}")
    adv = _base(rollouts, base, base_params, "aspo")
    rel, calls = tool_call_facts(rollouts, tool_pattern)
    eligible = (correctness(rollouts) > 0) & (calls > 0)
    values, sign = (rel, -1.0) if preference == "early_call" else (calls, 1.0)
    values = torch.nan_to_num(values, nan=0.0)
    return zero_failed(aspo_bonus(adv, values, eligible, rollouts.group, delta=delta, k=k, eps=eps, sign=sign), rollouts)


# -- GUI-Libra (arXiv:2602.22190) --------------------------------------------------------------------------------------


def success_adaptive_scale(adv: Tensor, success_rate: Tensor, *, s_min: float = 0.1, kappa: float = 1.0) -> Tensor:
    """A_i ← A_i·clip(p_g, s_min, 1)^κ where A_i < 0; positives unchanged (B20)."""
    scale = success_rate.clamp(s_min, 1.0) ** kappa
    return torch.where(adv < 0, adv * scale, adv)


@register("advantage", "gui_libra", spec="arXiv:2602.22190 (success-adaptive scaling; reconstructed from the abstract)",
          requires=("rewards",))
@torch.no_grad()
def gui_libra_advantage(rollouts: Rollouts, *, s_min: float = 0.1, kappa: float = 1.0, base: str = "grpo",
                        base_params: dict | None = None) -> Tensor:
    """GUI-Libra (arXiv:2602.22190): negative advantages shrink with the group's success rate p_g (unreliable negatives under
    partial verifiability); pair it with the ``kl`` regularizer (β > 0) as the paper's trust region.

    p_g = mean correctness of the group (the ``accuracy`` component, else reward > 0). Reconstructed from
    the abstract: κ = 1, s_min = 0.1 are our defaults.
    """
    adv = _base(rollouts, base, base_params, "gui_libra")
    correct = correctness(rollouts)
    mean, _, count = group_mean_std(correct, rollouts.group)
    success = torch.where(count > 1, mean, correct)  # a singleton's success rate is its own outcome
    return zero_failed(success_adaptive_scale(adv, success, s_min=s_min, kappa=kappa), rollouts)
