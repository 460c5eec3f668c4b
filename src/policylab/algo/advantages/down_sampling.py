"""D³S (arXiv:2509.22115): dynamic dual-level down-sampling — keep each group's max-variance rollouts, then
the tokens with the largest |A|·H, with both fractions relaxing to the full data.

Selecting rollouts drops rows, so the estimator is also a batch transform: its ``transform`` computes the
base advantages on the full groups (selection never renormalises them), drops the unselected rows and
stores the selected token-level advantages in ``d3s_advantage``, which the advantage call returns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.advantages.base_advantage import BaseAdvantage, broadcast_tokens
from policylab.algo.group_stats import group_index, zero_failed
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

declare_field("d3s_advantage", per_row=True, shape="[B,T]", dtype="float", owner="advantage 'd3s'",
              doc="base advantage of each kept rollout on its kept tokens (0 on down-sampled tokens)")


def max_variance_subset(values: Tensor, k: int) -> list[int]:
    """Indices of the k-subset of ``values`` with the largest population variance (exact).

    The optimum is the top-j ∪ bottom-(k−j) for some j; scan j = 0..k, ties -> j closest to k/2.
    """
    n = values.numel()
    if k >= n:
        return list(range(n))
    order = torch.argsort(values.double(), descending=True, stable=True).tolist()
    best, best_var, best_gap = None, -1.0, math.inf
    for j in range(k + 1):
        chosen = order[:j] + (order[n - (k - j):] if k - j > 0 else [])
        var = float(values[chosen].double().var(unbiased=False))
        gap = abs(j - k / 2)
        if var > best_var + 1e-12 or (abs(var - best_var) <= 1e-12 and gap < best_gap):
            best, best_var, best_gap = chosen, var, gap
    return sorted(best)


def relaxation(step: int, start: float, relax_steps: float) -> float:
    """ρ(t) = ρ0 + (1 − ρ0)·min(1, t/T_w): aggressive first, no down-sampling from T_w on."""
    return start + (1.0 - start) * min(1.0, step / max(relax_steps, 1e-9))


def token_keep_by_score(score: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Keep tokens with s ≥ quantile_{1−fraction}(s over valid tokens); fraction 1 keeps every valid token."""
    valid = mask > 0
    if fraction >= 1.0 or not bool(valid.any()):
        return valid.float()
    theta = torch.quantile(score[valid].float(), 1.0 - fraction)
    return ((score >= theta) & valid).float()


@register("advantage", "d3s", spec="arXiv:2509.22115 (reconstructed from the abstract)")
class D3SAdvantage:
    """D³S (arXiv:2509.22115): per group keep the k = max(2, ⌈ρ_s·G⌉) rollouts whose advantages have the
    largest variance, then the tokens with the largest |A|·H over the kept rollouts; ρ(t) = ρ0 + (1 − ρ0)·
    min(1, t/T_w) for both fractions.

    T_w = ``relax_steps``, or ``relax_fraction`` of ``total_steps`` (the run's train.steps; the stage
    context does not carry it). Dropped rollouts leave the batch in ``transform`` (no loss, no KL, no
    compute); dropped tokens get advantage 0 (regularizers still see them). H is the collection-time
    entropy (``requires`` ``entropy`` while token_fraction < 1). Zero-variance groups keep their first k
    rollouts (all A = 0) unless ``drop_zero_variance``. Reconstructed: ρ0 = 0.5 for both, T_w = 50 %.
    """

    provides = ("d3s_advantage",)

    def __init__(self, sample_fraction: float = 0.5, token_fraction: float = 0.5, relax_steps: int | None = None,
                 relax_fraction: float = 0.5, total_steps: int | None = None, drop_zero_variance: bool = False,
                 base: str = "grpo", base_params: dict | None = None):
        for name, value in (("sample_fraction", sample_fraction), ("token_fraction", token_fraction)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"d3s {name} must be in (0, 1], got {value}")
        self.sample_fraction, self.token_fraction = sample_fraction, token_fraction
        self.relax_steps, self.relax_fraction, self.total_steps = relax_steps, relax_fraction, total_steps
        self.drop_zero_variance = drop_zero_variance
        self.base = BaseAdvantage(base, base_params)
        self.steps = 0
        self.last_metrics: dict[str, float] = {}

    def requires(self) -> tuple[str, ...]:
        entropy = ("entropy",) if self.token_fraction < 1.0 else ()
        return tuple(dict.fromkeys(("rewards", *self.base.requires, *entropy, *self.provides)))

    def fractions(self) -> tuple[float, float]:
        if self.relax_steps is None and self.total_steps is None:
            raise ValueError("d3s needs relax_steps, or total_steps (the run's train.steps) for relax_fraction")
        horizon = self.relax_steps if self.relax_steps is not None else self.relax_fraction * self.total_steps
        return relaxation(self.steps, self.sample_fraction, horizon), relaxation(self.steps, self.token_fraction, horizon)

    def select_rows(self, adv_seq: Tensor, group: Tensor, rho: float) -> list[int]:
        keep: list[int] = []
        idx, n = group_index(group)
        for g in range(n):
            rows = (idx == g).nonzero().flatten()
            size = rows.numel()
            if size <= 2:
                keep += rows.tolist()
                continue
            k = max(2, math.ceil(rho * size))
            values = adv_seq[rows]
            if float(values.var(unbiased=False)) == 0.0:
                if not self.drop_zero_variance:
                    keep += rows[:k].tolist()
                continue
            keep += rows[max_variance_subset(values, k)].tolist()
        return sorted(keep)

    @torch.no_grad()
    def transform(self, rollouts: Rollouts, ctx=None) -> Rollouts:
        if self.total_steps is None and ctx is not None and ctx.total_steps:
            self.total_steps = ctx.total_steps  # the run's train.steps, unless the recipe fixed a horizon
        rho_s, rho_tok = self.fractions()
        adv = self.base(rollouts)
        adv_seq = adv if adv.dim() == 1 else (adv * rollouts.completion_mask).sum(-1) / rollouts.completion_mask.sum(-1).clamp(min=1)
        kept = self.select_rows(adv_seq, rollouts.group, rho_s)
        if not kept:
            raise ValueError("d3s dropped every group (all zero-variance with drop_zero_variance=True); nothing to train on")
        selected = rollouts.select(kept)
        adv_tok = broadcast_tokens(adv[kept], selected.completion_mask)
        if rho_tok < 1.0:
            if selected.entropy is None:
                raise ValueError("d3s token selection needs rollouts.entropy (declared in its requires)")
            keep_tok = token_keep_by_score(adv_tok.abs() * selected.entropy.float().cpu(), selected.completion_mask, rho_tok)
        else:
            keep_tok = selected.completion_mask.float()
        before = float(adv_seq.var(unbiased=False)) if adv_seq.numel() > 1 else 0.0
        after = float(adv_seq[kept].var(unbiased=False)) if len(kept) > 1 else 0.0
        self.last_metrics = {"d3s/sample_fraction": rho_s, "d3s/token_fraction": rho_tok,
                             "d3s/kept_samples": len(kept) / rollouts.batch_size,
                             "d3s/kept_tokens": float(keep_tok.sum() / selected.completion_mask.sum().clamp(min=1)),
                             "d3s/adv_var_before": before, "d3s/adv_var_after": after}
        self.steps += 1
        return selected.with_(extras=dict(selected.extras, d3s_advantage=adv_tok * keep_tok))

    def __call__(self, rollouts: Rollouts) -> Tensor:
        if "d3s_advantage" not in rollouts.extras:
            raise ValueError("d3s: rollouts.extras has no d3s_advantage; its transform(rollouts, ctx) must run first")
        return zero_failed(rollouts.extras["d3s_advantage"] * rollouts.completion_mask, rollouts)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.base.load_state_dict(state.get("base", {}))
