"""PIPO "layback" (objectives.md §4.4): a retrospective verdict on the previous update. If the batch mean
reward rose against a sliding window of past means, re-train on the previous batch with coefficients
C = xi_t * (group-normalised advantage); if it fell, (weakly) reverse it.

Loop mapping: the spec runs the layback update on B_{t-1} as its own optimizer step before the base update on
B_t. The loop has no "extra update" hook, so ``prepare`` appends the cached B_{t-1} rows (marked layback) to
B_t and the objective applies the layback loss to them; per-row scales n_all/n_part make one aggregation equal
base_loss(B_t) + loss_scale * layback_loss(B_{t-1}), i.e. ONE joint optimizer step instead of two sequential
ones (exact value and gradient of the sum at the current parameters; the code's second step would start from
the parameters after the first). Needs ``train.mini_batches: 1`` for the scales to be exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import fields

import torch
from torch import Tensor

from policylab import registry
from policylab.algo.group_stats import group_index
from policylab.algo.objectives import ppo_clip_loss
from policylab.algo.objectives_supervised.common import group_sum, part_scales
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

PROGRESS_CLIP = 5.0
COEF_CLIP = 10.0


def progress_scale(window: list[float], mu_t: float, *, variance_normalization: bool = True) -> tuple[float, float, float, float]:
    """(rho, p_t, sigma, xi_t): rho = mean(window), p = clip(mu_t - rho, -5, 5), sigma = population std of the window
    (1 if fewer than 2 entries or std < 1e-8), xi = p/sigma (or p without variance normalisation). §4.4."""
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
    """C_i = clamp(n * a_i / (sum_{j in group} |a_j| + 1e-6) * xi, -10, 10), n = the group's size (§4.4)."""
    idx, k = group_index(group)
    a = token_mean_adv.float()
    n = group_sum(torch.ones_like(a), idx, k)
    total = group_sum(a.abs(), idx, k)
    progress_adv = n[idx] * a / (total[idx] + 1e-6)
    return (progress_adv * xi).clamp(-COEF_CLIP, COEF_CLIP)


def layback_gate(*, window_len: int, has_cache: bool, step: int, p: float, xi: float, min_steps: int, every_n: int,
                 threshold: float, loss_scale_neg: float) -> float:
    """Loss scale of the layback update, 0 = skip (§4.4 gate): too short a window, nothing cached, off-cycle step,
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


class PipoObjective:
    """PIPO (Policy Improvement Policy Optimization), objectives.md §4.4, on top of PPO-clip/GRPO.

    Base rows: PPO-clip with the recipe's advantage. Layback rows (previous batch, appended by ``prepare``):
    :func:`layback_token_losses` with C from :func:`layback_coefficients` and xi from :func:`progress_scale`,
    times the gate's loss scale (1, or ``loss_scale_neg`` after a drop). The window holds the last
    ``history_window`` batch means; by default mu_t is NOT in its own baseline; ``pipo_code_compat=True``
    reproduces the release (append mu_t before computing rho/sigma, and again after the update).
    The base advantages of the cached batch come from a fresh instance of the recipe's advantage (stateless
    advantages give the same values). See the module docstring for the joint-step approximation.
    """

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
        self.cache: Rollouts | None = None
        self.base_advantage = None

    # -- prepare: decide, cache, append ---------------------------------------------------------
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
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
        snapshot = self.snapshot(rollouts, ctx)
        current = self.mark(rollouts, layback=False, coef=torch.zeros(rollouts.batch_size),
                            old_logp=torch.zeros_like(rollouts.completion_mask))
        if scale > 0:
            previous = self.cache
            coef = layback_coefficients(previous.extras["pipo_adv"], previous.group, xi)
            previous = previous.with_(group=previous.group + int(rollouts.group.max()) + 1)
            previous = self.mark(previous, layback=True, coef=coef, old_logp=previous.extras["pipo_old_logp"])
            shared = set(current.extras) & set(previous.extras)
            current.extras = {k: v for k, v in current.extras.items() if k in shared}
            previous.extras = {k: v for k, v in previous.extras.items() if k in shared}
            batch = Rollouts.concat([current, previous])
            is_layback = batch.extras["pipo_layback"]
            part = part_scales(ctx, batch.completion_mask, [~is_layback, is_layback])
            batch.extras["pipo_scale"] = torch.where(is_layback, part * scale, part)
        else:
            batch = current
            batch.extras["pipo_scale"] = torch.ones(batch.batch_size)
        for key, value in {"mu_t": mu_t, "mu_his": rho, "sigma_his": sigma, "xi_t": xi, "loss_scale": scale}.items():
            batch.extras[f"pipo_{key}"] = torch.tensor(float(value))
        self.cache = snapshot
        # after the update mu_t joins the window; with code_compat this is the release's second append
        self.window.append(mu_t)
        return batch

    @torch.no_grad()
    def snapshot(self, rollouts: Rollouts, ctx) -> Rollouts:
        """B_t as it will be needed at t+1: its rollout-time log-probs and its base advantages."""
        copy = rollouts.select(torch.arange(rollouts.batch_size))
        old = rollouts.old_logp if rollouts.old_logp is not None else rollouts.behavior_logp
        if old is None:
            old = ctx.score(rollouts).logp
        if self.base_advantage is None:
            config = getattr(ctx, "config", None)
            spec = config.algorithm.advantage if config is not None else None
            name, params = (spec.name, spec.params) if spec is not None else ("grpo", {})
            self.base_advantage = registry.build("advantage", name, params)
        adv = self.base_advantage(rollouts)
        copy.extras = {k: v for k, v in copy.extras.items() if not k.startswith("pipo_")}
        copy.extras["pipo_old_logp"] = old.float().clone()
        copy.extras["pipo_adv"] = token_mean_advantage(adv, rollouts.completion_mask)
        return copy

    @staticmethod
    def mark(rollouts: Rollouts, *, layback: bool, coef: Tensor, old_logp: Tensor) -> Rollouts:
        extras = {k: v for k, v in rollouts.extras.items() if k not in ("pipo_adv",)}
        extras["pipo_layback"] = torch.full((rollouts.batch_size,), layback, dtype=torch.bool)
        extras["pipo_coef"] = coef.float()
        extras["pipo_old_logp"] = old_logp.float()
        return rollouts.with_(extras=extras)

    # -- the loss ---------------------------------------------------------------------------------
    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        base, metrics = ppo_clip_loss(out, batch, eps_low=self.eps_low, eps_high=self.eps_high)
        if "pipo_layback" not in batch.extras:
            return base, metrics
        device = out.logp.device
        is_layback = batch.extras["pipo_layback"].to(device)
        layback = layback_token_losses(out.logp, batch.extras["pipo_old_logp"].to(device),
                                       batch.extras["pipo_coef"].to(device), self.layback_eps)
        loss = torch.where(is_layback[:, None], layback, base) * batch.extras["pipo_scale"].to(device)[:, None]
        for key in ("mu_t", "mu_his", "sigma_his", "xi_t", "loss_scale"):
            metrics[f"layback/{key}"] = batch.extras[f"pipo_{key}"].detach().float()
        metrics["layback/rows_frac"] = is_layback.float().mean()
        return loss * batch.completion_mask, metrics

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cache = None if self.cache is None else {f.name: getattr(self.cache, f.name) for f in fields(Rollouts)}
        return {"window": list(self.window), "calls": self.calls, "cache": cache}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.calls = state["calls"]
        self.cache = None if state["cache"] is None else Rollouts(**state["cache"])


register("objective", "pipo", spec="objectives.md §4.4")(PipoObjective)
