"""Rollout correction: importance weights and masks for the mismatch between the policy that sampled a batch
(the rollout engine's behaviour log-probs, ``behavior_logp``) and the training forward of the policy the update
starts from (``old_logp`` when the loop froze it, else the detached training forward).

Every correction here is a pure function of the per-token log-ratio d_t = log pi_train(y_t) - log pi_behav(y_t)
and returns a detached [B,T] factor that multiplies the objective's per-token loss (recipe section
``algorithm.rollout_correction``, a list whose factors multiply), so it composes with every objective. A masked
token or sequence gets factor 0 and keeps its place in the aggregation's denominator (the normaliser is global).

References: truncated IS for the inference/training mismatch, Yao et al. "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training" (2025, fengyao.notion.site; TIS w = min(rho, C)); masked IS / IcePop, Ling
team "IcePop" (2025; drop tokens whose ratio leaves [low, high]); sequence-level and geometric-mean masks as in
verl ``algorithm.rollout_correction`` and TRL ``vllm_importance_sampling_mode`` (token/sequence x truncate/mask).
With identical log-probs (d = 0) every factor is 1: the correction is the identity on-policy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

LOG_RATIO_CLAMP = 20.0  # exp never overflows; a ratio beyond e^20 is capped or masked anyway


def mismatch_log_ratio(train_logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> Tensor:
    """[B,T] d_t = log pi_train - log pi_behav on trained tokens (0 elsewhere), clamped to +-20."""
    return ((train_logp - behavior_logp) * mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(delta: Tensor, mask: Tensor, geometric: bool = False) -> Tensor:
    """[B] sum_t d_t (log of the sequence ratio prod_t rho_t) or, ``geometric``, its per-token mean."""
    total = (delta * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if geometric else total


def token_tis_weights(delta: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Token-level truncated IS: w_t = min(exp(d_t), C)."""
    return torch.exp(delta).clamp(max=cap) * mask


def sequence_tis_weights(delta: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Sequence-level truncated IS: w_i = min(exp(sum_t d_t), C) on every token of row i."""
    w = torch.exp(sequence_log_ratio(delta, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)
    return w[:, None] * mask


def token_mis_mask(delta: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """Masked IS at the token level (IcePop): keep token t iff low <= exp(d_t) <= high."""
    ratio = torch.exp(delta)
    return ((ratio >= low) & (ratio <= high)).to(mask.dtype) * mask


def sequence_mis_mask(delta: Tensor, mask: Tensor, low: float, high: float, geometric: bool = False) -> Tensor:
    """Keep row i iff low <= r_i <= high, r_i = exp(sum_t d_t) (sequence) or exp(mean_t d_t) (``geometric``)."""
    r = torch.exp(sequence_log_ratio(delta, mask, geometric).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return ((r >= low) & (r <= high)).to(mask.dtype)[:, None] * mask


def mismatch_metrics(train_logp: Tensor, behavior_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Token means over trained tokens: KL(pi_behav || pi_train) by the k1 (mean of -d) and k3
    (mean of e^d - 1 - d, >= 0) estimators on behaviour samples, mean |d|, and max |d| (reduced by max)."""
    delta = mismatch_log_ratio(train_logp, behavior_logp, mask)
    n = mask.sum().clamp(min=1)
    absd = delta.abs() * mask
    return {
        "rollout_corr/kl_k1": (-delta * mask).sum() / n,
        "rollout_corr/kl_k3": ((torch.exp(delta) - 1 - delta) * mask).sum() / n,
        "rollout_corr/abs_dlogp_mean": absd.sum() / n,
        "rollout_corr/abs_dlogp_max": absd.max() if absd.numel() else torch.tensor(0.0),
    }


def _train_logp(out: PolicyOutputs, batch: Rollouts) -> Tensor:
    """The policy the update starts from: frozen ``old_logp`` (mu > 1, mini-batches), else the detached forward."""
    return (batch.old_logp.to(out.logp.device) if batch.old_logp is not None else out.logp).detach()


def _delta(out: PolicyOutputs, batch: Rollouts, who: str) -> tuple[Tensor, Tensor]:
    if batch.behavior_logp is None:
        raise ValueError(f"rollout correction {who!r} needs the engine's behaviour log-probs (rollouts.behavior_logp)")
    mask = batch.completion_mask.to(out.logp.device)
    train = _train_logp(out, batch)
    return mismatch_log_ratio(train, batch.behavior_logp.to(train.device), mask), mask


def _check_bounds(low: float, high: float, who: str) -> None:
    if not 0 <= low < 1 < high:
        raise ValueError(f"rollout correction {who!r}: need 0 <= low < 1 < high, got low={low}, high={high}")


def _report(out: PolicyOutputs, batch: Rollouts, factor: Tensor, mask: Tensor) -> dict[str, Tensor]:
    metrics = mismatch_metrics(_train_logp(out, batch), batch.behavior_logp.to(mask.device), mask)
    n = mask.sum().clamp(min=1)
    metrics["rollout_corr/masked_frac"] = ((factor == 0) & (mask > 0)).float().sum() / n
    metrics["rollout_corr/weight_mean"] = (factor * mask).sum() / n
    return metrics


@register("rollout_correction", "tis", requires=("behavior_logp",),
          spec="Yao et al. 2025 (truncated IS, 'Your efficient RL framework secretly brings you off-policy RL training')")
def tis(out: PolicyOutputs, batch: Rollouts, *, level: str = "token", cap: float = 2.0) -> tuple[Tensor, dict]:
    """Truncated IS: w = min(pi_train/pi_behav, cap) per token (``level="token"``) or per sequence (the product
    of the token ratios, ``level="sequence"``), multiplied into the per-token loss."""
    if cap <= 0:
        raise ValueError(f"rollout correction 'tis': cap must be > 0, got {cap}")
    delta, mask = _delta(out, batch, "tis")
    if level == "token":
        w = token_tis_weights(delta, mask, cap)
    elif level == "sequence":
        w = sequence_tis_weights(delta, mask, cap)
    else:
        raise ValueError(f"rollout correction 'tis': level must be 'token' or 'sequence', got {level!r}")
    return w.detach(), _report(out, batch, w, mask)


@register("rollout_correction", "mis", aliases=("icepop",), requires=("behavior_logp",),
          spec="IcePop (Ling team 2025, masked IS); sequence and geometric-mean masks as verl rollout_correction")
def mis(out: PolicyOutputs, batch: Rollouts, *, level: str = "token", low: float = 0.5,
        high: float = 2.0) -> tuple[Tensor, dict]:
    """Masked IS: factor 0 where the ratio pi_train/pi_behav leaves [low, high], else 1. The ratio is per token
    (``level="token"``, IcePop), of the whole sequence (``"sequence"``, the product of token ratios) or its
    geometric mean (``"geometric"``, exp of the mean token log-ratio, length-independent)."""
    _check_bounds(low, high, "mis")
    delta, mask = _delta(out, batch, "mis")
    if level == "token":
        m = token_mis_mask(delta, mask, low, high)
    elif level in ("sequence", "geometric"):
        m = sequence_mis_mask(delta, mask, low, high, geometric=level == "geometric")
    else:
        raise ValueError(f"rollout correction 'mis': level must be 'token', 'sequence' or 'geometric', got {level!r}")
    return m.detach(), _report(out, batch, m, mask)
