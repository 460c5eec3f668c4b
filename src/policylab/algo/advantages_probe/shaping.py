"""Advantage re-weighting from cheap per-rollout facts (advantages_rewards.md B16, B17, B18, B20).

AEM rescales by group-normalised surprisal, ASPO nudges correct tool-using rollouts by when they first
call a tool, GUI-Libra damps negative advantages by the group's success rate, and GUI-G1 weights each
sample's loss by a difficulty coefficient (a token_weights component). All start from a registered base
advantage (``base``, default ``grpo``) and never change the sign of a base advantage unless stated.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import BaseAdvantage, correctness, zero_failed
from policylab.algo.group_stats import group_index, group_mean_std
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def _base(rollouts: Rollouts, base: str, base_params: dict | None, who: str) -> Tensor:
    adv = BaseAdvantage(base, base_params)(rollouts)
    if adv.dim() != 1:
        raise ValueError(f"{who} rescales a sequence-level base advantage; base {base!r} returned [B,T]")
    return adv


# -- AEM (B16) ----------------------------------------------------------------------------------------


def aem_weights(surprisal: Tensor, group: Tensor, *, beta: float = 0.5, w_min: float = 0.5, w_max: float = 1.5,
                eps: float = 1e-6) -> Tensor:
    """w_i = clip(1 − β·z_i, w_min, w_max), z = group-standardised surprisal (unbiased std; std 0 or G=1 -> w=1)."""
    mean, std, count = group_mean_std(surprisal, group)
    z = torch.where((count > 1) & (std > 0), (surprisal - mean) / (std + eps), torch.zeros_like(surprisal))
    return (1 - beta * z).clamp(w_min, w_max)


def response_surprisal(logp: Tensor, mask: Tensor) -> Tensor:
    """u_i = −mean_t log π_old(o_t) over the response's trained tokens (0 for empty responses)."""
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@register("advantage", "aem", spec="advantages_rewards.md B16")
@torch.no_grad()
def aem_advantage(rollouts: Rollouts, *, beta: float = 0.5, w_min: float = 0.5, w_max: float = 1.5, eps: float = 1e-6,
                  base: str = "grpo", base_params: dict | None = None) -> Tensor:
    """AEM: A'_i = clip(1 − β·z_i, w_min, w_max)·A_i, z_i = group-normalised mean token NLL of the response.

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


# -- ASPO (B17) ---------------------------------------------------------------------------------------


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
    """([B] relative position of the first tool call in [0,1] (NaN if none), [B] number of tool calls).

    Prefers engine facts ``extras['first_tool_call']`` (token index, −1 = none) and ``extras['tool_calls']``;
    otherwise finds ``pattern`` in the completion text (position as a fraction of its characters).
    """
    b = rollouts.batch_size
    if "first_tool_call" in rollouts.extras:
        first = torch.as_tensor(rollouts.extras["first_tool_call"]).float()
        lengths = rollouts.completion_mask.sum(-1).clamp(min=1)
        rel = torch.where(first >= 0, first / lengths, torch.full_like(first, float("nan")))
        calls = torch.as_tensor(rollouts.extras.get("tool_calls", (first >= 0).float())).float()
        return rel, calls
    regex = re.compile(pattern)
    rel, calls = torch.full((b,), float("nan")), torch.zeros(b)
    for i, text in enumerate(rollouts.completions or [""] * b):
        hits = list(regex.finditer(text))
        if hits:
            rel[i] = hits[0].start() / max(1, len(text))
            calls[i] = len(hits)
    return rel, calls


@register("advantage", "aspo", spec="advantages_rewards.md B17")
@torch.no_grad()
def aspo_advantage(rollouts: Rollouts, *, delta: float = 0.5, k: float = 0.5, eps: float = 1e-6,
                   preference: str = "early_call", tool_pattern: str = r"<tool_call>|```python",
                   base: str = "grpo", base_params: dict | None = None) -> Tensor:
    """ASPO: a behaviour preference enters the advantage, clipped to ±k|A_i| so its sign never flips (k < 1).

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


# -- GUI-Libra (B20) --------------------------------------------------------------------------------------


def success_adaptive_scale(adv: Tensor, success_rate: Tensor, *, s_min: float = 0.1, kappa: float = 1.0) -> Tensor:
    """A_i ← A_i·clip(p_g, s_min, 1)^κ where A_i < 0; positives unchanged (B20)."""
    scale = success_rate.clamp(s_min, 1.0) ** kappa
    return torch.where(adv < 0, adv * scale, adv)


@register("advantage", "gui_libra", spec="advantages_rewards.md B20")
@torch.no_grad()
def gui_libra_advantage(rollouts: Rollouts, *, s_min: float = 0.1, kappa: float = 1.0, base: str = "grpo",
                        base_params: dict | None = None) -> Tensor:
    """GUI-Libra: negative advantages shrink with the group's success rate p_g (unreliable negatives under
    partial verifiability); pair it with the ``kl`` regularizer (β > 0) as the paper's trust region.

    p_g = mean correctness of the group (the ``accuracy`` component, else reward > 0). Reconstructed from
    the abstract: κ = 1, s_min = 0.1 are our defaults.
    """
    adv = _base(rollouts, base, base_params, "gui_libra")
    correct = correctness(rollouts)
    mean, _, count = group_mean_std(correct, rollouts.group)
    success = torch.where(count > 1, mean, correct)  # a singleton's success rate is its own outcome
    return zero_failed(success_adaptive_scale(adv, success, s_min=s_min, kappa=kappa), rollouts)


# -- GUI-G1 (B18) -----------------------------------------------------------------------------------------


def difficulty_weights(rows: list[dict], *, source: str = "rate", field: str = "rate", mean_value: float | None = None,
                       low: float = 0.5, high: float = 2.0) -> Tensor:
    """Per-sample difficulty coefficient w_i (B18).

    "rate": the dataset's ``field`` as given (released code; absent -> 1). "pass_rate": text analogue
    w = clip((1 − p̂_q)/(1 − p̄), low, high) from an offline pass rate. "box": GUI grounding
    w = clip(sqrt(ā/a_i), low, high), a_i = relative target size. p̄ / ā default to the batch mean.
    """
    if source == "rate":
        return torch.tensor([float(r.get(field, 1.0)) for r in rows])
    if source not in ("pass_rate", "box"):
        raise ValueError(f"gui_g1 source must be 'rate', 'pass_rate' or 'box', got {source!r}")
    missing = [i for i, r in enumerate(rows) if field not in r]
    if missing:
        raise ValueError(f"gui_g1 source {source!r} needs the row field {field!r}; rows {missing[:5]} lack it")
    values = torch.tensor([float(r[field]) for r in rows], dtype=torch.float64)
    mean = float(values.mean()) if mean_value is None else mean_value
    if source == "pass_rate":
        w = (1 - values) / max(1e-8, 1 - mean)
    else:
        w = torch.sqrt(mean / values.clamp(min=1e-12))
    return w.clamp(low, high).float()


@register("token_weights", "gui_g1", spec="advantages_rewards.md B18")
def gui_g1_weights(out: PolicyOutputs, batch: Rollouts, *, source: str = "rate", field: str = "rate",
                   mean_value: float | None = None, low: float = 0.5, high: float = 2.0) -> tuple[Tensor, dict]:
    """GUI-G1 difficulty scaling: every token of sample i is weighted by w_i.

    Use with ``advantage: dr_grpo`` (no std division) and ``aggregate: seq-mean-token-sum-norm`` with
    ``rollout.max_new_tokens`` equal to the constant T_c (64 in the released code): loss =
    mean_i(w_i·Σ_t ℓ·M / T_c). The difficulty definition is reconstructed (see ``difficulty_weights``).
    """
    w = difficulty_weights(batch.rows, source=source, field=field, mean_value=mean_value, low=low, high=high)
    if w.numel() != batch.batch_size:
        raise ValueError(f"gui_g1 needs one row per completion; got {w.numel()} rows for batch {batch.batch_size}")
    weights = w.to(out.logp.device)[:, None].expand_as(out.logp)
    return weights, {"gui_g1/mean_weight": w.mean()}
