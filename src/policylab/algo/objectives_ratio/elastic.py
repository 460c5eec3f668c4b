"""Per-sample and per-token clip ranges: ETR's outcome-guided elastic trust regions (§2.6) and HAPO's
entropy-driven clipping, advantage redistribution, token-level group advantage and sampling temperature (§2.7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from policylab.algo.advantages import grpo_advantage
from policylab.algo.group_stats import group_index, group_mean_std, nan_to_zero
from policylab.algo.objectives import clipped_surrogate, masked_mean, ratio_metrics, token_log_ratio
from policylab.algo.objectives_ratio._shared import batch_statistic, frac, require_rewards, token_entropy
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

# --------------------------------------------------------------------------------------------------
# ETR


def group_population_variance(rewards: Tensor, group: Tensor) -> Tensor:
    """Per-row population variance of the group's non-NaN rewards; singleton and empty groups: 0."""
    _, std, count = group_mean_std(rewards.float(), group, unbiased=False)
    return torch.where(count > 1, std**2, torch.zeros_like(std))


def etr_clip_ranges(adv: Tensor, group_var: Tensor, *, eps0_low: float, eps0_high: float, alpha: float, beta: float,
                    adv_cap: float, var_max: float, sides: str = "both", eps_low_cap: float = 0.9) -> tuple[Tensor, Tensor]:
    """ETR elastic ranges (§2.6): eps_i = eps0 * m_i * M_g with
    m_i = 1 + alpha*min(|A_i|, c_A)/c_A (micro) and M_g = 1 + beta*sigma_g^2/sigma_max^2 (macro).

    ``sides``: "both" widens both bounds, "high_only" keeps eps_low = eps0_low. eps_low is capped at 0.9.
    """
    if adv_cap <= 0 or var_max <= 0:
        raise ValueError(f"etr adv_cap and var_max must be > 0, got {adv_cap}, {var_max}")
    micro = 1 + alpha * adv.abs().clamp(max=adv_cap) / adv_cap
    macro = 1 + beta * group_var / var_max
    eps_high = eps0_high * micro * macro
    if sides == "both":
        eps_low = eps0_low * micro * macro
    elif sides == "high_only":
        eps_low = torch.full_like(eps_high, eps0_low)
    else:
        raise ValueError(f"etr sides must be 'both' or 'high_only', got {sides!r}")
    return eps_low.clamp(max=eps_low_cap), eps_high


class ETR:
    """ETR (objectives.md §2.6): PPO-clip with a per-sample range widened by |A| and by group reward variance.

    j = min(rho*A, clip(rho, 1-eps_low_i, 1+eps_high_i)*A). The group variance (population, sigma_max^2 = 0.25
    for {0,1} rewards so M_g = 1 + beta*4p(1-p)) is computed once per rollout batch in ``prepare``.
    Reconstructed: the factor forms and defaults (eps0 0.2/0.2, alpha 0.5, beta 0.5, c_A 3) are the spec's guesses.

    T-MICRO holds after ``prepare`` only (hence the tag): the group reward variance is a whole-rollout-batch
    statistic (§0: group statistics once per rollout batch), which the shared fixture, splitting groups
    without ``prepare``, cannot give; this package's tests check T-MICRO after ``prepare``.
    """

    VAR_KEY = "etr/group_reward_var"

    def __init__(self, eps0_low: float = 0.2, eps0_high: float = 0.2, alpha: float = 0.5, beta: float = 0.5,
                 adv_cap: float = 3.0, var_max: float = 0.25, sides: str = "both", eps_low_cap: float = 0.9):
        if sides not in ("both", "high_only"):
            raise ValueError(f"etr sides must be 'both' or 'high_only', got {sides!r}")
        self.kw = dict(eps0_low=eps0_low, eps0_high=eps0_high, alpha=alpha, beta=beta, adv_cap=adv_cap,
                       var_max=var_max, sides=sides, eps_low_cap=eps_low_cap)

    def group_variance(self, batch: Rollouts) -> Tensor:
        return group_population_variance(require_rewards(batch, "etr"), batch.group)

    def prepare(self, rollouts: Rollouts, ctx=None) -> Rollouts:
        return rollouts.with_(extras={**rollouts.extras, self.VAR_KEY: self.group_variance(rollouts)})

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        adv = batch.seq_advantages()
        log_ratio = token_log_ratio(out, batch)
        ratio = torch.exp(log_ratio)
        group_var = batch_statistic(batch, self.VAR_KEY, self.group_variance).to(ratio)[:, None]
        eps_low, eps_high = etr_clip_ranges(adv, group_var.expand_as(adv), **self.kw)
        loss, is_clipped, _ = clipped_surrogate(ratio, adv, eps_low, eps_high, None)
        metrics = ratio_metrics(ratio, log_ratio, mask)
        metrics["clipfrac"] = masked_mean(is_clipped.float(), mask)
        metrics["etr/eps_high_mean"] = masked_mean(eps_high, mask)
        metrics["etr/eps_low_mean"] = masked_mean(eps_low, mask)
        metrics["etr/eps_high_max"] = (eps_high * mask).max() if mask.any() else torch.tensor(0.0)
        return loss, metrics


register("objective", "etr", spec="objectives.md §2.6", tags=("skip:T-MICRO",))(ETR)

# --------------------------------------------------------------------------------------------------
# HAPO: normalised entropy, adaptive clip, redistribution


@dataclass
class HapoEntropyStats:
    """What (c) of §2.7 produces over a batch, reused by the sampler (a) at the next step."""

    pivot: float  # q: the entropy_pivot quantile of log H
    rms: float  # sqrt(mean((log H - q)^2))
    pos_max: float  # max of the positive normalised values (1 when there are none)
    neg_min: float  # min of the non-positive normalised values (-1 when there are none)


def hapo_entropy_stats(entropy: Tensor, mask: Tensor, pivot_quantile: float, floor: float = 1e-8) -> HapoEntropyStats:
    """Statistics of x = log(max(H, floor)) over valid tokens (§2.7c): nearest-rank quantile, RMS around it."""
    x = torch.log(entropy.float().clamp(min=floor))[mask > 0]
    if x.numel() == 0:
        return HapoEntropyStats(0.0, 1.0, 1.0, -1.0)
    q = torch.quantile(x, pivot_quantile, interpolation="nearest")
    rms = ((x - q) ** 2).mean().clamp(min=1e-8).sqrt()
    h = (x - q) / rms
    pos, neg = h[h > 0], h[h < 0]
    return HapoEntropyStats(float(q), float(rms), float(pos.max()) if pos.numel() else 1.0,
                            float(neg.min()) if neg.numel() else -1.0)


def hapo_normalised_entropy(entropy: Tensor, mask: Tensor, pivot_quantile: float = 0.8, code_compat: bool = False) -> Tensor:
    """h^ in [-1, 1] (§2.7c): h = (x - q)/RMS; h>0 divided by max h, h<=0 by |min h| (negative = low entropy).

    ``code_compat=True`` reproduces the released code, which divides the negative branch by min h (< 0),
    flipping its sign so h^ >= 0 everywhere and the low-entropy branches never trigger.
    """
    stats = hapo_entropy_stats(entropy, mask, pivot_quantile)
    h = (torch.log(entropy.float().clamp(min=1e-8)) - stats.pivot) / stats.rms
    negative_scale = stats.neg_min if code_compat else abs(stats.neg_min)
    h_hat = torch.where(h > 0, h / stats.pos_max, h / negative_scale)
    return h_hat * mask


def hapo_adaptive_clip(h_hat: Tensor, eps_low: float, eps_high: float, alpha: float) -> tuple[Tensor, Tensor]:
    """(§2.7d) h^<=0: eps_low' = eps_low*(1 - alpha*h^); h^>0: eps_high' = eps_high*(1 + alpha*h^)."""
    low = torch.where(h_hat <= 0, eps_low * (1 - alpha * h_hat), torch.full_like(h_hat, eps_low))
    high = torch.where(h_hat > 0, eps_high * (1 + alpha * h_hat), torch.full_like(h_hat, eps_high))
    return low, high


def hapo_redistributed_advantage(adv: Tensor, h_hat: Tensor, ratio: Tensor, eps_low: Tensor, eps_high: Tensor,
                                 beta: float) -> Tensor:
    """(§2.7e) A_ent = A*(1 + beta*h^); neutral zone N = (1 - eps_low'/2, 1 + eps_high'/2), open.

    h^>0: A' = A inside N, A_ent outside; h^<=0: A' = A_ent inside N, A outside.
    """
    boosted = adv * (1 + beta * h_hat)
    inside = (ratio > 1 - eps_low / 2) & (ratio < 1 + eps_high / 2)
    use_boost = torch.where(h_hat > 0, ~inside, inside)
    return torch.where(use_boost, boosted, adv)


# --------------------------------------------------------------------------------------------------
# HAPO: sampling temperature (a)


def hapo_token_temperature(logits: Tensor, stats: HapoEntropyStats | None, base_temperature: float, tau: float) -> Tensor:
    """T_t = T0*(1 + tau*h^) from the untempered next-token logits [N,V] (§2.7a); T0 when no stats yet.

    H is computed in fp32; h = (log max(H, 1e-6) - q_prev)/(rms_prev + 1e-6), scaled by the previous batch's
    positive max / |negative min|, clamped to [-1, 1].
    """
    if stats is None:
        return torch.full(logits.shape[:-1], float(base_temperature), device=logits.device)
    z = logits.float()
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
    h = (torch.log(entropy.clamp(min=1e-6)) - stats.pivot) / (stats.rms + 1e-6)
    h_hat = torch.where(h > 0, h / stats.pos_max, h / abs(stats.neg_min)).clamp(-1, 1)
    return base_temperature * (1 + tau * h_hat)


class HapoTemperature:
    """A generation logits processor applying HAPO's per-token temperature (§2.7a).

    It sees the raw next-token logits and divides them by the relative factor T_t/T0 = 1 + tau*h^; the engine's
    own temperature step (the hf engine's ``TemperatureOnly`` processor, or transformers' warper) must run
    after it and divide by T0, so the sampled distribution is softmax(logits / T_t). ``stats`` is refreshed by
    the HAPO objective's ``prepare`` after every batch; before the first, the factor is 1.
    """

    def __init__(self, tau: float, stats: HapoEntropyStats | None = None):
        self.tau = tau
        self.stats = stats
        self.temperature_sum = 0.0
        self.temperature_count = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        factor = hapo_token_temperature(scores, self.stats, 1.0, self.tau)
        self.temperature_sum += float(factor.sum())
        self.temperature_count += factor.numel()
        return scores / factor.to(scores.dtype)[:, None]

    def pop_mean_factor(self) -> float | None:
        """Mean T_t/T0 since the last call (None before any generation)."""
        if not self.temperature_count:
            return None
        mean = self.temperature_sum / self.temperature_count
        self.temperature_sum, self.temperature_count = 0.0, 0
        return mean


# --------------------------------------------------------------------------------------------------
# HAPO objective and advantage


class HAPO:
    """HAPO (objectives.md §2.7, exact except the corrected h^ sign): entropy-adaptive dual-clip PPO.

    Per token, from the current forward's entropy normalised to h^ in [-1,1] over the micro-batch (c):
    adaptive clip (d), advantage redistribution around a neutral zone (e), then dual-clip PPO with
    (eps_low', eps_high', A') and clip_ratio_c = 10, token-mean (f). Pair with the ``hapo`` advantage (b).
    Sampling temperature (a): ``prepare`` turns the batch's entropies into statistics for the next step,
    and ``logits_processor()`` hands the rollout engine a processor that applies them (None when tau = 0).

    Shared tests not satisfied by the spec's design (hence the tags): T-ONPOL — on-policy rho = 1 lies in the
    neutral zone, so low-entropy tokens (h^ <= 0) train with A*(1 + beta*h^), not A; T-MICRO — h^ is
    normalised per training micro-batch, as in the released code. ``hapo_code_compat=True`` reproduces the
    release (h^ >= 0 everywhere).
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2, clip_alpha: float = 1.0, adv_beta: float = 1.0,
                 entropy_pivot: float = 0.8, dual_clip_c: float | None = 10.0, temperature_tau: float = 0.05,
                 hapo_code_compat: bool = False):
        if not 0.0 <= entropy_pivot <= 1.0:
            raise ValueError(f"hapo entropy_pivot must be a quantile in [0, 1], got {entropy_pivot}")
        self.eps_low, self.eps_high = eps_low, eps_high
        self.clip_alpha, self.adv_beta, self.entropy_pivot = clip_alpha, adv_beta, entropy_pivot
        self.dual_clip_c, self.code_compat = dual_clip_c, hapo_code_compat
        self.temperature = HapoTemperature(temperature_tau)

    def logits_processor(self):
        """The sampling-temperature processor for the next generation, or None when temperature_tau is 0."""
        return self.temperature if self.temperature.tau != 0 else None

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if self.temperature.tau == 0:  # no adaptive sampling: skip the scoring pass
            return rollouts
        entropy = rollouts.entropy
        if entropy is None and ctx is not None and ctx.score is not None:
            entropy = ctx.score(rollouts).entropy
        if entropy is not None:
            self.temperature.stats = hapo_entropy_stats(entropy.detach(), rollouts.completion_mask, self.entropy_pivot)
        return rollouts

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        adv = batch.seq_advantages()
        log_ratio = token_log_ratio(out, batch)
        ratio = torch.exp(log_ratio)
        h_hat = hapo_normalised_entropy(token_entropy(out, batch, "hapo"), mask, self.entropy_pivot, self.code_compat)
        eps_low, eps_high = hapo_adaptive_clip(h_hat, self.eps_low, self.eps_high, self.clip_alpha)
        adv_new = hapo_redistributed_advantage(adv, h_hat, ratio.detach(), eps_low, eps_high, self.adv_beta)
        loss, is_clipped, dual = clipped_surrogate(ratio, adv_new, eps_low, eps_high, self.dual_clip_c)
        inside = (ratio.detach() > 1 - eps_low / 2) & (ratio.detach() < 1 + eps_high / 2)
        metrics = ratio_metrics(ratio, log_ratio, mask)
        metrics["clipfrac"] = masked_mean(is_clipped.float(), mask)
        metrics["clipfrac/dual"] = masked_mean(dual.float(), mask)
        metrics["hapo/h_hat"] = masked_mean(h_hat, mask)
        metrics["hapo/eps_low"] = masked_mean(eps_low, mask)
        metrics["hapo/eps_high"] = masked_mean(eps_high, mask)
        metrics["hapo/neutral_zone"] = frac(inside, mask)
        mean_factor = self.temperature.pop_mean_factor()
        if mean_factor is not None:
            metrics["hapo/sampling_temperature_factor"] = torch.tensor(mean_factor)
        return loss, metrics

    def state_dict(self) -> dict:
        stats = self.temperature.stats
        return {"sampling_stats": asdict(stats) if stats is not None else None}

    def load_state_dict(self, state: dict) -> None:
        stats = state.get("sampling_stats")
        self.temperature.stats = HapoEntropyStats(**stats) if stats is not None else None


register("objective", "hapo", spec="objectives.md §2.7", tags=("skip:T-ONPOL", "skip:T-MICRO"))(HAPO)


@register("advantage", "hapo", spec="objectives.md §2.7(b); advantages_rewards.md A9")
@torch.no_grad()
def hapo_advantage(rollouts: Rollouts, *, eps: float = 1e-6, fallback_threshold: float = 5.0) -> Tensor:
    """Token-level group average (§2.7b): every valid token carries its response's reward.

    mu_g = sum_i L_i R_i / sum_i L_i, sigma_g = sqrt(sum_i L_i (R_i - mu_g)^2 / sum_i L_i) (population,
    token-weighted), A_i = (R_i - mu_g)/(sigma_g + eps). A group with any |A_i| >= fallback_threshold uses
    the GRPO advantage instead. Failed rows (NaN reward) are left out of the statistics and get 0.
    """
    r = require_rewards(rollouts, "hapo advantage").double()
    valid = ~torch.isnan(r)
    weight = torch.where(valid, rollouts.lengths.double(), torch.zeros_like(r))
    r0 = torch.where(valid, r, torch.zeros_like(r))
    idx, k = group_index(rollouts.group)
    total_w = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, weight)
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, weight * r0) / total_w.clamp(min=1e-12)
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, weight * (r0 - mean[idx]) ** 2) / total_w.clamp(min=1e-12)
    adv = (r0 - mean[idx]) / (var.sqrt()[idx] + eps)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    too_large = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, (adv.abs() >= fallback_threshold).double()) > 0
    fallback = grpo_advantage(rollouts, eps=eps).double()
    adv = torch.where(too_large[idx], fallback, adv)
    return nan_to_zero(adv).to(rollouts.rewards.dtype)
