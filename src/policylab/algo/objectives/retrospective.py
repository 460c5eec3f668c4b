"""PIPO's retrospective verification ("layback"; Wang et al. 2026, arXiv:2604.00860): a verdict on the previous
update. If the batch mean reward rose against a sliding window of past means, re-train on the previous batch
with coefficients C = xi_t * (group-normalised advantage); if it fell, (weakly) reverse it.

Loop mapping: the spec runs the layback update on B_{t-1} as its own optimizer step before the base update on
B_t. The loop has no "extra update" hook, so the objective's batch ``transform`` appends the cached B_{t-1} rows
(marked layback) to B_t and the loss applies the layback loss to them; per-row scales n_all/n_part make one
token-mean aggregation equal base_loss(B_t) + loss_scale * layback_loss(B_{t-1}), i.e. ONE joint optimizer step
instead of two sequential ones (exact value and gradient of the sum at the current parameters; the code's
second step would start from the parameters after the first). Needs ``train.mini_batches: 1`` and the
``token-mean`` aggregation for the scales to be exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import fields

import torch
from torch import Tensor

from policylab.algo.group_stats import group_index
from policylab.algo.group_stats import group_sum
from policylab.algo.objectives.policy_gradient import ppo_clip_loss
from policylab.algo.objectives.sequence_level import part_scales
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

PROGRESS_CLIP = 5.0
COEF_CLIP = 10.0


def progress_scale(window: list[float], mu_t: float, *, variance_normalization: bool = True) -> tuple[float, float, float, float]:
    """(rho, p_t, sigma, xi_t): rho = mean(window), p = clip(mu_t - rho, -5, 5), sigma = population std of the window
    (1 if fewer than 2 entries or std < 1e-8), xi = p/sigma (or p without variance normalisation)."""
    if not window:
        raise ValueError("progress_scale needs a non-empty window of past batch means")
    rho = sum(window) / len(window)
    p = max(-PROGRESS_CLIP, min(PROGRESS_CLIP, mu_t - rho))
    sigma = 1.0
    if len(window) >= 2:
        std = math.sqrt(sum((x - rho) ** 2 for x in window) / len(window))
        sigma = std if std >= 1e-8 else 1.0
    xi = p / sigma if variance_normalization else p
    return rho, p, sigma, xi


def layback_coefficients(token_mean_adv: Tensor, group: Tensor, xi: float) -> Tensor:
    """C_i = clamp(n * a_i / (sum_{j in group} |a_j| + 1e-6) * xi, -10, 10), n = the group's size."""
    idx, k = group_index(group)
    a = token_mean_adv.float()
    n = group_sum(torch.ones_like(a), idx, k)
    total = group_sum(a.abs(), idx, k)
    progress_adv = n[idx] * a / (total[idx] + 1e-6)
    return (progress_adv * xi).clamp(-COEF_CLIP, COEF_CLIP)


def layback_gate(*, window_len: int, has_cache: bool, step: int, p: float, xi: float, min_steps: int, every_n: int,
                 threshold: float, loss_scale_neg: float) -> float:
    """Loss scale of the layback update, 0 = skip (the spec's gate): too short a window, nothing cached, off-cycle step,
    |xi| <= threshold (threshold 0 = never skip), or a drop (p < 0) without a negative scale."""
    if window_len < min_steps or not has_cache or step % every_n != 0:
        return 0.0
    if threshold > 0 and abs(xi) <= threshold:
        return 0.0
    if p < 0:
        return loss_scale_neg if loss_scale_neg > 0 else 0.0
    return 1.0


def layback_token_losses(logp: Tensor, old_logp: Tensor, coef: Tensor, eps: float) -> Tensor:
    """l = -min(rho, clip(rho, 1-eps, 1+eps)) * C, rho = exp(logp - old_logp_{t-1}) (verl GRPO layback loss)."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    return -torch.minimum(ratio, ratio.clamp(1 - eps, 1 + eps)) * coef[:, None]


def token_mean_advantage(adv: Tensor, mask: Tensor) -> Tensor:
    if adv.dim() == 1:
        return adv.float()
    return (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _field(name: str, shape: str, dtype: str, doc: str, per_row: bool = True):
    return declare_field(name, per_row=per_row, shape=shape, dtype=dtype, owner="objective 'pipo'", doc=doc)


PIPO_FIELDS = (
    _field("pipo_layback", "[B]", "bool", "row is a replayed row of the previous batch B_{t-1} (layback loss)"),
    _field("pipo_coef", "[B]", "float", "layback coefficient C_i of a replayed row (0 on current rows)"),
    _field("pipo_old_logp", "[B,T]", "float", "rollout-time log-probs of a replayed row (0 on current rows)"),
    _field("pipo_scale", "[B]", "float", "per-row factor: n_all/n_part token counts, times the loss scale on replayed rows"),
    _field("pipo_row", "[B]", "long", "index of a current row in B_t (-1 on replayed rows): the loss records B_t's "
                                     "advantages by it, for the next layback"),
    *(_field(f"pipo_{key}", "scalar", "float", doc, per_row=False) for key, doc in (
        ("mu_t", "mean reward of the current batch"), ("mu_his", "mean of the window of past batch means (rho)"),
        ("sigma_his", "population std of the window (1 if < 2 entries or flat)"), ("xi_t", "normalised progress p/sigma"),
        ("loss_scale", "loss scale of this step's layback update (0 = none)"))),
)
PIPO_METRICS = ("mu_t", "mu_his", "sigma_his", "xi_t", "loss_scale")


class PipoObjective:
    """PIPO (Policy Improvement Policy Optimization; Wang et al. 2026, arXiv:2604.00860, "layback" in the released
    code), on top of PPO-clip/GRPO.

    In words: compare the batch mean reward mu_t with a window of past batch means; the normalised progress
    xi_t = clip(mu_t - mean, -5, 5) / std is a verdict on the previous update, and the previous batch is trained
    again with coefficients C_i = clamp(n * a_i / sum_group |a_j| * xi_t, -10, 10) (a = its base advantages,
    token-mean): reinforced after a rise, (weakly, ``loss_scale_neg``) reversed after a drop.
    Base rows: PPO-clip with the recipe's advantage. Layback rows (previous batch, appended by ``transform``):
    :func:`layback_token_losses` with C from :func:`layback_coefficients` and xi from :func:`progress_scale`,
    times the gate's loss scale (:func:`layback_gate`). The window holds the last ``history_window`` batch means;
    by default mu_t is NOT in its own baseline; ``pipo_code_compat=True`` reproduces the release (append mu_t
    before computing rho/sigma, and again after the update). See the module docstring for the joint-step
    approximation (``aggregates``: token-mean).

    State, not a side channel: ``transform`` caches B_t (rows, rollout-time ``behavior_logp``); the base advantages
    of B_t are the ones the loop computed for it, recorded when the loss runs on B_t's rows (they carry their
    index in ``pipo_row``). A row whose advantage was never seen (a skipped step) gets coefficient 0.
    """

    requires = ("rewards", "behavior_logp")
    provides = PIPO_FIELDS
    aggregates = ("token-mean",)  # the part scales are written for this aggregation

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.2, layback_eps: float = 0.2, history_window: int = 8,
                 min_steps_before_layback: int = 8, loss_scale_neg: float = 0.0, variance_normalization: bool = True,
                 threshold: float = 0.0, every_n_steps: int = 1, pipo_code_compat: bool = False):
        if history_window < 1 or every_n_steps < 1:
            raise ValueError("pipo: history_window and every_n_steps must be >= 1")
        self.eps_low, self.eps_high, self.layback_eps = eps_low, eps_high, layback_eps
        self.min_steps, self.loss_scale_neg, self.variance_normalization = min_steps_before_layback, loss_scale_neg, variance_normalization
        self.threshold, self.every_n, self.code_compat = threshold, every_n_steps, pipo_code_compat
        self.window: deque[float] = deque(maxlen=history_window)
        self.calls = 0
        self.cache: Rollouts | None = None  # B_{t-1} as it came in (no pipo fields)
        self.cache_adv: Tensor | None = None  # [B_{t-1}] token-mean base advantages, NaN until the loss saw the row

    # -- transform: decide, cache, append -------------------------------------------------------
    def transform(self, rollouts: Rollouts, ctx) -> Rollouts:
        self.calls += 1
        rewards = rollouts.rewards.float()
        valid = ~torch.isnan(rewards)
        mu_t = float(rewards[valid].mean()) if valid.any() else 0.0
        if self.code_compat:
            self.window.append(mu_t)
        rho, p, sigma, xi = progress_scale(list(self.window), mu_t, variance_normalization=self.variance_normalization) \
            if self.window else (mu_t, 0.0, 1.0, 0.0)
        scale = layback_gate(window_len=len(self.window), has_cache=self.cache is not None, step=self.calls, p=p, xi=xi,
                             min_steps=self.min_steps, every_n=self.every_n, threshold=self.threshold,
                             loss_scale_neg=self.loss_scale_neg)
        b = rollouts.batch_size
        snapshot = rollouts.select(torch.arange(b))
        current = self.mark(rollouts, layback=False, coef=torch.zeros(b), old_logp=torch.zeros_like(rollouts.completion_mask),
                            row=torch.arange(b))
        if scale > 0:
            previous = self.cache
            adv = torch.nan_to_num(self.cache_adv, nan=0.0)
            coef = layback_coefficients(adv, previous.group, xi)
            previous = previous.with_(group=previous.group + int(rollouts.group.max()) + 1)
            previous = self.mark(previous, layback=True, coef=coef, old_logp=previous.behavior_logp,
                                 row=torch.full((previous.batch_size,), -1))
            shared = set(current.extras) & set(previous.extras)
            current.extras = {k: v for k, v in current.extras.items() if k in shared}
            previous.extras = {k: v for k, v in previous.extras.items() if k in shared}
            batch = Rollouts.concat([current, previous])
            is_layback = batch.extras["pipo_layback"]
            part = part_scales(batch.completion_mask, [~is_layback, is_layback])
            batch.extras["pipo_scale"] = torch.where(is_layback, part * scale, part)
        else:
            batch = current
            batch.extras["pipo_scale"] = torch.ones(b)
        for key, value in zip(PIPO_METRICS, (mu_t, rho, sigma, xi, scale)):
            batch.extras[f"pipo_{key}"] = torch.tensor(float(value))
        self.cache = snapshot
        self.cache_adv = torch.full((b,), float("nan"))
        # after the update mu_t joins the window; with code_compat this is the release's second append
        self.window.append(mu_t)
        return batch

    @staticmethod
    def mark(rollouts: Rollouts, *, layback: bool, coef: Tensor, old_logp: Tensor, row: Tensor) -> Rollouts:
        extras = dict(rollouts.extras)
        extras["pipo_layback"] = torch.full((rollouts.batch_size,), layback, dtype=torch.bool)
        extras["pipo_coef"] = coef.float()
        extras["pipo_old_logp"] = old_logp.float()
        extras["pipo_row"] = row.long()
        return rollouts.with_(extras=extras)

    def record_advantages(self, batch: Rollouts) -> None:
        """Keep the base advantages of the current rows of ``batch`` (token-mean) for the next layback."""
        rows = batch.extras["pipo_row"].cpu()
        if self.cache_adv is None or batch.advantages is None or not (rows >= 0).any():
            return
        current = (rows >= 0) & (rows < self.cache_adv.numel())
        adv = token_mean_advantage(batch.advantages.detach(), batch.completion_mask).cpu()
        self.cache_adv[rows[current]] = adv[current]

    # -- the loss ---------------------------------------------------------------------------------
    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        base, metrics = ppo_clip_loss(out, batch, eps_low=self.eps_low, eps_high=self.eps_high)
        if "pipo_layback" not in batch.extras:  # a bare call: PPO-clip
            return base, metrics
        self.record_advantages(batch)
        device = out.logp.device
        is_layback = batch.extras["pipo_layback"].to(device)
        layback = layback_token_losses(out.logp, batch.extras["pipo_old_logp"].to(device),
                                       batch.extras["pipo_coef"].to(device), self.layback_eps)
        loss = torch.where(is_layback[:, None], layback, base) * batch.extras["pipo_scale"].to(device)[:, None]
        for key in PIPO_METRICS:
            metrics[f"layback/{key}"] = batch.extras[f"pipo_{key}"].detach().float()
        metrics["layback/rows_frac"] = is_layback.float().mean()
        return loss * batch.completion_mask, metrics

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cache = None if self.cache is None else {f.name: getattr(self.cache, f.name) for f in fields(Rollouts)}
        return {"window": list(self.window), "calls": self.calls, "cache": cache, "cache_adv": self.cache_adv}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.calls = state["calls"]
        self.cache = None if state["cache"] is None else Rollouts(**state["cache"])
        self.cache_adv = state.get("cache_adv")


register("objective", "pipo", spec="arXiv:2604.00860 (PIPO retrospective verification, 'layback')")(PipoObjective)
