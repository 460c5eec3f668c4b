"""BRPO — Budget Relative Policy Optimization for anytime reasoning (arXiv:2505.13438), the arithmetic.

Each thinking trace is cut at S budgets and a summary written after each cut is verified (the
generation and scoring run in policylab/annotate/summaries.py). Thinking tokens of segment s get
A = R_{g,s} − b_{g,s}, a baseline mixing the trace's own earlier rewards (V1) and the group's mean
future return (V2); summary tokens get their reward minus the mean at the same budget.
Exact from sail-sg/AnytimeReasoner ``brpo.py`` (``compute_cot_advantage``, ``compute_summary_advantage``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.group_stats import group_index

VARIANTS = ("brpo", "v1only", "v2only", "none")


def budget_weights(num_budgets: int, kind: str = "uniform") -> Tensor:
    """p_s over the S budgets: "uniform" (1/S) or "linear" (∝ s+1); the released "base" prior is not recovered."""
    if num_budgets < 1:
        raise ValueError(f"brpo needs num_budgets >= 1, got {num_budgets}")
    if kind == "uniform":
        return torch.full((num_budgets,), 1.0 / num_budgets, dtype=torch.float64)
    if kind == "linear":
        w = torch.arange(1, num_budgets + 1, dtype=torch.float64)
        return w / w.sum()
    raise ValueError(f"brpo budget_prior must be 'uniform' or 'linear', got {kind!r}")


def budget_cuts(max_budget: int, num_budgets: int) -> list[int]:
    """Token counts b_1 < ... < b_S splitting ``max_budget`` evenly (rounded up)."""
    return [math.ceil((s + 1) * max_budget / num_budgets) for s in range(num_budgets)]


def budget_segments(width: int, cuts: list[int]) -> Tensor:
    """[width] long: the budget segment s of each thinking-token position (positions past b_S -> S−1)."""
    return torch.bucketize(torch.arange(width), torch.tensor(cuts), right=True).clamp(max=len(cuts) - 1)


def brpo_think_advantages(r: Tensor, prior: Tensor, *, variant: str = "brpo", discount_base: float = 2.0) -> Tensor:
    """A^think [G,S] from per-budget summary rewards r [G,S] of one prompt's G traces.

    R_{g,s} = Σ_{j≥s} p_j r_{g,j}; V2_s = mean_g R_{g,s} (0 if G = 1); V1_{g,0} = 0, V1_{g,s} =
    (Σ_{j<s} base^j r_{g,j} / Σ_{j<s} base^j)·Σ_{j≥s} p_j; b = (s·V1 + (S−s)·V2)/S (s 0-based), or V1 /
    V2 / 0 for the v1only / v2only / none variants.
    """
    if variant not in VARIANTS:
        raise ValueError(f"brpo variant must be one of {VARIANTS}, got {variant!r}")
    r, p = r.double(), prior.double()
    g, s_count = r.shape
    tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])  # Σ_{j≥s} p_j
    returns = torch.flip(torch.cumsum(torch.flip(r * p, [1]), 1), [1])
    v2 = returns.mean(0, keepdim=True).expand(g, s_count) if g > 1 else torch.zeros_like(returns)
    v1 = torch.zeros_like(returns)
    weights = discount_base ** torch.arange(s_count, dtype=torch.float64)
    for s in range(1, s_count):
        v1[:, s] = (r[:, :s] * weights[:s]).sum(-1) / weights[:s].sum() * tail[s]
    steps = torch.arange(s_count, dtype=torch.float64)
    baseline = {"brpo": (steps * v1 + (s_count - steps) * v2) / s_count, "v1only": v1, "v2only": v2,
                "none": torch.zeros_like(returns)}[variant]
    return returns - baseline


def brpo_summary_advantages(rewards: Tensor) -> Tensor:
    """A^sum [G,S,A] = r − mean of the A summaries of the same trace and budget; with A = 1, the mean over
    the G traces at that budget."""
    if rewards.shape[-1] > 1:
        return rewards - rewards.mean(-1, keepdim=True)
    return rewards - rewards.mean(0, keepdim=True)


def brpo_advantages(summary_rewards: Tensor, group: Tensor, prior: Tensor, cuts: list[int], width: int, *,
                    variant: str = "brpo", discount_base: float = 2.0) -> tuple[Tensor, Tensor]:
    """(thinking-token advantages [B,width], summary advantages [B,S,A]) from the summary rewards [B,S,A]
    of a batch, each prompt group on its own."""
    b = summary_rewards.shape[0]
    think = torch.zeros(b, width)
    summary_adv = torch.zeros(summary_rewards.shape, dtype=torch.float64)
    segment = budget_segments(width, cuts)
    idx, k = group_index(group)
    for g in range(k):
        members = (idx == g).nonzero().flatten()
        a_think = brpo_think_advantages(summary_rewards[members].mean(-1), prior, variant=variant,
                                        discount_base=discount_base)
        think[members] = a_think[:, segment].float()
        summary_adv[members] = brpo_summary_advantages(summary_rewards[members].double())
    return think, summary_adv
