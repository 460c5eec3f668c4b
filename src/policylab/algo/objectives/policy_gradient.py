"""Baseline policy-gradient objectives (REINFORCE, PPO-clip with clip-higher and dual clip, GSPO, CISPO) and the
ratio helpers every other objective builds on. Each objective returns a per-token loss to minimise.

Contract: ``fn(out: PolicyOutputs, batch: Rollouts, **params) -> (loss [B,T], metrics)`` where metrics
are scalar tensors averaged over the micro-batch's trained tokens (or sequences where named so).
The loop multiplies by the mask and aggregates with a global normaliser; objectives never aggregate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

LOG_RATIO_CLAMP = 20.0  # verl convention: clamp log-ratios before exp, so exp never overflows


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over valid positions (0 when there are none); of a 0/1 flag it is the fraction that holds."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_max(x: Tensor, mask: Tensor, empty: float = 0.0) -> Tensor:
    valid = mask > 0
    return x[valid].max() if valid.any() else torch.tensor(empty, dtype=x.dtype, device=x.device)


def token_entropy(out: PolicyOutputs, batch: Rollouts, who: str, prefer: str = "current") -> Tensor:
    """Detached token entropy [B,T]: the training forward's (``prefer='current'``) or the collection-time one.

    Falls back to the other source when the preferred one is missing; raises naming both when neither is there.
    """
    sources = (out.entropy, batch.entropy) if prefer == "current" else (batch.entropy, out.entropy)
    for entropy in sources:
        if entropy is not None:
            return entropy.detach().float()
    raise ValueError(f"{who} needs token entropies: PolicyOutputs.entropy or rollouts.entropy")


def batch_statistic(batch: Rollouts, key: str, compute: Callable[[Rollouts], Tensor]) -> Tensor:
    """``batch.extras[key]`` when the component's ``annotate`` hook provided it for the whole rollout batch, else
    ``compute(batch)`` on the rows at hand (direct calls, e.g. in tests)."""
    value = batch.extras.get(key)
    if value is not None:
        return torch.as_tensor(value)
    return compute(batch)


def old_logp_of(out: PolicyOutputs, batch: Rollouts) -> Tensor:
    """Log-probs of the policy that produced the batch; on-policy (none stored) it is sg(logp)."""
    if batch.old_logp is not None:
        return batch.old_logp
    return out.logp.detach()


def token_log_ratio(out: PolicyOutputs, batch: Rollouts) -> Tensor:
    return (out.logp - old_logp_of(out, batch)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ratio_metrics(ratio: Tensor, log_ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    valid = mask > 0
    r = ratio.detach()[valid]
    if r.numel() == 0:
        r = torch.ones(1)
    return {
        "ratio/mean": r.mean(),
        "ratio/max": r.max(),
        "ratio/min": r.min(),
        "ppo_kl": masked_mean(-log_ratio.detach(), mask),
    }


@register("objective", "reinforce", spec="Williams 1992, REINFORCE (no arXiv id); the T-ONPOL reference")
def reinforce_loss(out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
    """REINFORCE (Williams 1992): l = -A * logp, the vanilla policy gradient every PPO-style loss must equal on-policy."""
    adv = batch.seq_advantages()
    return -adv * out.logp, {}


# GPG (arXiv:2504.02546 §3): the plain policy gradient -A logp, no ratio, clip or KL; its bias correction is in the
# ``gpg`` advantage (policylab/algo/advantages/group_baselines.py). verl registers it as loss_mode='gpg'.
register("objective", "gpg", spec="arXiv:2504.02546 §3 (GPG: the policy-gradient loss; verl loss_mode='gpg')")(reinforce_loss)


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip_c: float | None):
    """max(-A*rho, -A*clip(rho)) with optional dual clip for A<0; returns (loss, clipped, dual_clipped)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    dual = torch.zeros_like(is_clipped)
    if dual_clip_c is not None:
        if dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        cap = -adv * dual_clip_c
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
    return loss, is_clipped, dual


@register("objective", "ppo_clip",
          spec="arXiv:1707.06347 §3 eq. 7; dual clip arXiv:1912.09729; clip-higher arXiv:2503.14476 §3.1")
def ppo_clip_loss(
    out: PolicyOutputs,
    batch: Rollouts,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, dict]:
    """PPO-clip (arXiv:1707.06347 eq. 7) as used by GRPO (arXiv:2402.03300): the pessimistic maximum of the
    unclipped and the clipped surrogate, l = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), rho = pi/pi_old per
    token. An asymmetric ``eps_high`` is DAPO's clip-higher (arXiv:2503.14476 §3.1); dual clip (arXiv:1912.09729)
    caps the loss of a negative-advantage token at -A c: l = min(l, -A c) where A<0.

    Library default: dual clip off (TRL behaviour); set dual_clip_c=3.0 for verl's.
    """
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    loss, is_clipped, dual = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip_c)
    metrics = ratio_metrics(ratio, log_ratio, mask)
    metrics["clipfrac"] = masked_mean(is_clipped.float(), mask)
    metrics["clipfrac/high"] = masked_mean((is_clipped & (adv > 0)).float(), mask)
    metrics["clipfrac/low"] = masked_mean((is_clipped & (adv < 0)).float(), mask)
    metrics["clipfrac/dual"] = masked_mean(dual.float(), mask)
    return loss, metrics


def sequence_log_ratio(out: PolicyOutputs, batch: Rollouts) -> Tensor:
    """[B] (1/L_i) sum_t m*(logp - old_logp): log of GSPO's geometric-mean ratio s_i."""
    mask = batch.completion_mask
    d = token_log_ratio(out, batch)
    return (d * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@register("objective", "gspo", spec="arXiv:2507.18071 (GSPO; GSPO-token)")
def gspo_loss(out: PolicyOutputs, batch: Rollouts, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, dict]:
    """GSPO / GSPO-token (arXiv:2507.18071): the importance ratio is the sequence's geometric-mean ratio
    s_i = exp((1/L_i) sum_t log rho_t), applied to every token as s_{i,t} = exp(sg(log s_i) + logp_t - sg(logp_t))
    and clipped at sequence level like PPO's token ratio.

    With a per-sequence advantage this is GSPO; with per-token advantages it is GSPO-token. Use the
    seq-mean-token-mean aggregation (the recipes do; the paper's objective is a mean over sequences).
    """
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_s = sequence_log_ratio(out, batch)
    log_s_tok = (log_s.detach()[:, None] + out.logp - out.logp.detach()).clamp(max=10.0)
    s_tok = torch.exp(log_s_tok)
    loss, is_clipped, _ = clipped_surrogate(s_tok, adv, eps_low, eps_high, None)
    seq_clipped = ((is_clipped.float() * mask).sum(-1) > 0).float()
    has_tokens = (mask.sum(-1) > 0).float()
    metrics = ratio_metrics(torch.exp(log_s)[:, None].expand_as(mask), token_log_ratio(out, batch), mask)
    metrics["clipfrac"] = (seq_clipped * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    metrics["gspo/abs_log_s"] = (log_s.detach().abs() * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    return loss, metrics


register("objective", "gspo_token", spec="arXiv:2507.18071 (GSPO-token: per-token advantages)")(gspo_loss)


@register("objective", "cispo", spec="arXiv:2506.13585 (CISPO, MiniMax-M1)")
def cispo_loss(out: PolicyOutputs, batch: Rollouts, *, eps_low: float = 1.0, eps_high: float = 4.0) -> tuple[Tensor, dict]:
    """CISPO (arXiv:2506.13585, MiniMax-M1): clip the importance-sampling weight, not the update —
    l = -sg(clip(rho, 1-eps_low, 1+eps_high)) * A * logp, so every token keeps its gradient.

    Defaults follow the paper/TRL: no lower bound (eps_low >= 1), upper cap rho <= 1 + eps_high = 5.
    """
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    loss = -weight * adv * out.logp
    metrics = ratio_metrics(ratio, log_ratio, mask)
    metrics["clipfrac"] = masked_mean((weight != ratio.detach()).float(), mask)
    metrics["cispo/weight_mean"] = masked_mean(weight, mask)
    return loss, metrics
