"""Token and sample selection (advantages_rewards.md D1–D3): which tokens and rollouts the policy
gradient sees.

EARL and VPPO are ``token_weights`` (multiplied into the per-token loss; the denominator of the
aggregation still counts every valid token, TRL semantics). D³S selects whole rollouts, so it is an
``advantage`` whose ``prepare`` drops rows from the batch after computing the base advantages on the
full groups (selection never renormalises them) and whose token level zeroes advantages.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import BaseAdvantage, broadcast_tokens, perturbed_prompt_logp, zero_failed
from policylab.algo.group_stats import group_index
from policylab.algo.objectives import old_logp_of
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

# -- EARL (D1) ------------------------------------------------------------------------------------------


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_fraction: float) -> tuple[Tensor, Tensor]:
    """m = 1[H ≥ θ]·M, θ = linear-interpolated quantile (1 − ρ) of H over valid tokens (ties kept).

    Returns (mask, θ); no valid token -> all-zero mask and θ = 0.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    valid = mask > 0
    if not bool(valid.any()):
        return torch.zeros_like(mask, dtype=torch.float32), torch.tensor(0.0)
    theta = torch.quantile(entropy[valid].float(), 1.0 - top_fraction)
    return ((entropy >= theta) & valid).float(), theta


@register("token_weights", "earl", spec="advantages_rewards.md D1")
def earl_weights(out: PolicyOutputs, batch: Rollouts, *, top_fraction: float = 0.2) -> tuple[Tensor, dict]:
    """EARL: policy gradient only on the top-ρ highest-entropy tokens (training-forward entropy, detached).

    The quantile runs over the micro-batch's valid tokens (TRL ``top_entropy_quantile`` semantics; not
    gathered across micro-batches). ρ = 0.2 is the 80/20 default; EARL's own fraction was not recovered.
    """
    if out.entropy is None:
        raise ValueError("earl needs PolicyOutputs.entropy from the training forward")
    entropy = out.entropy.detach()
    mask = batch.completion_mask.to(entropy.device)
    keep, theta = high_entropy_mask(entropy, mask, top_fraction)
    dropped = mask * (1 - keep)
    metrics = {
        "earl/kept_frac": keep.sum() / mask.sum().clamp(min=1),
        "earl/threshold": theta,
        "earl/entropy_kept": (entropy * keep).sum() / keep.sum().clamp(min=1),
        "earl/entropy_dropped": (entropy * dropped).sum() / dropped.sum().clamp(min=1),
    }
    return keep, metrics


# -- D³S (D2) ------------------------------------------------------------------------------------------


def max_variance_subset(values: Tensor, k: int) -> list[int]:
    """Indices of the k-subset of ``values`` with the largest population variance (D2, exact).

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


@register("advantage", "d3s", spec="advantages_rewards.md D2; data_agents_eval.md A3")
class D3SAdvantage:
    """D³S: per group keep the k = max(2, ⌈ρ_s·G⌉) rollouts with maximal advantage variance, then the
    tokens with the largest |A|·H; both fractions relax linearly to 1 over ``relax_steps`` steps
    (default ``relax_fraction`` of the run's ``train.steps``).

    Dropped rollouts leave the batch in ``prepare`` (no loss, no KL, no compute); dropped tokens get
    advantage 0 (regularizers still see them, data_agents_eval.md A3 assumption). Entropies are the
    engine's (``rollouts.entropy``) or one no-grad scoring pass. Zero-variance groups keep their first k
    rollouts (all A = 0) unless ``drop_zero_variance``. Reconstructed: ρ0 = 0.5 for both, T_w = 50 %.
    """

    def __init__(self, sample_fraction: float = 0.5, token_fraction: float = 0.5, relax_steps: int | None = None,
                 relax_fraction: float = 0.5, drop_zero_variance: bool = False, base: str = "grpo",
                 base_params: dict | None = None):
        for name, value in (("sample_fraction", sample_fraction), ("token_fraction", token_fraction)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"d3s {name} must be in (0, 1], got {value}")
        self.sample_fraction, self.token_fraction = sample_fraction, token_fraction
        self.relax_steps, self.relax_fraction, self.drop_zero_variance = relax_steps, relax_fraction, drop_zero_variance
        self.base = BaseAdvantage(base, base_params)
        self.steps = 0
        self.metrics: dict[str, float] = {}

    def fractions(self, total_steps: int | None) -> tuple[float, float]:
        horizon = self.relax_steps if self.relax_steps is not None else self.relax_fraction * (total_steps or 1)
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
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        train = getattr(getattr(ctx, "config", None), "train", None)
        rho_s, rho_tok = self.fractions(getattr(train, "steps", None))
        adv = self.base(rollouts)
        adv_seq = adv if adv.dim() == 1 else (adv * rollouts.completion_mask).sum(-1) / rollouts.completion_mask.sum(-1).clamp(min=1)
        kept = self.select_rows(adv_seq, rollouts.group, rho_s)
        if not kept:
            raise ValueError("d3s dropped every group (all zero-variance with drop_zero_variance=True); nothing to train on")
        selected = rollouts.select(kept)
        adv_tok = broadcast_tokens(adv[kept], selected.completion_mask)
        if rho_tok < 1.0:
            entropy = selected.entropy
            if entropy is None:
                if getattr(ctx, "score", None) is None:
                    raise ValueError("d3s token selection needs rollouts.entropy or ctx.score in prepare()")
                entropy = ctx.score(selected).entropy
            keep_tok = token_keep_by_score(adv_tok.abs() * entropy.float().cpu(), selected.completion_mask, rho_tok)
        else:
            keep_tok = selected.completion_mask.float()
        before = float(adv_seq.var(unbiased=False)) if adv_seq.numel() > 1 else 0.0
        after = float(adv_seq[kept].var(unbiased=False)) if len(kept) > 1 else 0.0
        self.metrics = {"d3s/sample_fraction": rho_s, "d3s/token_fraction": rho_tok,
                        "d3s/kept_samples": len(kept) / rollouts.batch_size,
                        "d3s/kept_tokens": float(keep_tok.sum() / selected.completion_mask.sum().clamp(min=1)),
                        "d3s/adv_var_before": before, "d3s/adv_var_after": after}
        self.steps += 1
        extras = dict(selected.extras, d3s_advantage=adv_tok * keep_tok)
        return selected.with_(extras=extras)

    def __call__(self, rollouts: Rollouts) -> Tensor:
        if "d3s_advantage" not in rollouts.extras:
            raise ValueError("d3s: rollouts.extras has no selected advantages; the loop must call prepare(rollouts, ctx) first")
        return zero_failed(rollouts.extras["d3s_advantage"] * rollouts.completion_mask, rollouts)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.base.load_state_dict(state.get("base", {}))


# -- VPPO (D3, text analogue) ---------------------------------------------------------------------------


def perception_kl(old_logp: Tensor, aug_logp: Tensor) -> Tensor:
    """κ = clamp(e^d − d − 1, 0, 10), d = clamp(aug − old, −20, 20) (k3 between true and corrupted input)."""
    d = (aug_logp - old_logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(0.0, 10.0)


def top_tokens_per_row(score: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Per response keep the top k_i = ⌈fraction·L_i⌉ tokens by ``score`` (valid tokens only)."""
    keep = torch.zeros_like(mask, dtype=torch.float32)
    lengths = (mask > 0).sum(-1)
    masked = torch.where(mask > 0, score.float(), torch.full_like(score, -math.inf, dtype=torch.float32))
    for i in range(score.shape[0]):
        k = min(int(lengths[i]), math.ceil(fraction * int(lengths[i]) - 1e-9))
        if k > 0:
            keep[i, torch.topk(masked[i], k).indices] = 1.0
    return keep


def trajectory_scaling(kappa: Tensor, mask: Tensor, t_min: float = 0.9) -> Tensor:
    """f_i = t_min + n_i(t_max − t_min), n = min-max normalised mean κ, t_max = t_min + (1 − t_min)/(mean n + 1e-8).

    Over the valid rows of the (micro-)batch; a spread ≤ 1e-6 (or no valid row) gives f = 1.
    """
    lengths = mask.sum(-1)
    valid = lengths > 0
    s = (kappa * mask).sum(-1) / lengths.clamp(min=1)
    if not bool(valid.any()):
        return torch.ones_like(s)
    s_min, s_max = s[valid].min(), s[valid].max()
    if float(s_max - s_min) <= 1e-6:
        return torch.ones_like(s)
    n = ((s - s_min) / (s_max - s_min)).clamp(0.0, 1.0)
    mu = n[valid].mean()
    t_max = t_min + (1 - t_min) / (mu + 1e-8)
    return torch.where(valid, t_min + n * (t_max - t_min), torch.ones_like(s))


@register("token_weights", "vppo", spec="advantages_rewards.md D3")
class VPPOWeights:
    """VPPO (text analogue): train on the ⌈ρ·L_i⌉ tokens whose prediction depends most on the prompt
    context, κ = k3(old, aug), and scale each trajectory by f_i (mean κ, min-max normalised, mean f = 1).

    "aug" = the same completion scored with a corrupted prompt (each prompt token replaced with
    probability ``mask_prob``, the last ``protect_last`` tokens kept; ours). Weights = mask·f_i, which
    for PPO-clip equals A_i ← f_i·A_i on the kept tokens (f > 0). VPPO's entropy penalty
    c_H·(−mean log π) is the ``papo`` regularizer with gamma 0, eta_ori c_H (see the vppo recipe).
    """

    def __init__(self, top_fraction: float = 0.4, scaling_min: float = 0.9, mask_prob: float = 0.6, protect_last: int = 0,
                 seed: int = 0, batch_size: int = 16):
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"vppo top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction, self.scaling_min, self.mask_prob, self.protect_last = top_fraction, scaling_min, mask_prob, protect_last
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        aug = perturbed_prompt_logp(rollouts, ctx, mask_prob=self.mask_prob, protect_last=self.protect_last,
                                    generator=self.generator, batch_size=self.batch_size)
        return rollouts.with_(extras=dict(rollouts.extras, vppo_aug_logp=aug))

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if "vppo_aug_logp" not in batch.extras:
            raise ValueError("vppo: batch.extras has no corrupted-prompt log-probs; the loop must call prepare(rollouts, ctx) first")
        device = out.logp.device
        mask = batch.completion_mask.to(device)
        kappa = perception_kl(old_logp_of(out, batch).detach().to(device), batch.extras["vppo_aug_logp"].to(device)) * mask
        keep = top_tokens_per_row(kappa, mask, self.top_fraction)
        factor = trajectory_scaling(kappa, mask, self.scaling_min)
        rejected = mask * (1 - keep)
        metrics = {
            "vppo/token_frac": keep.sum() / mask.sum().clamp(min=1),
            "vppo/kappa_selected": (kappa * keep).sum() / keep.sum().clamp(min=1),
            "vppo/kappa_rejected": (kappa * rejected).sum() / rejected.sum().clamp(min=1),
            "vppo/scaling_max": factor.max(),
            "vppo/scaling_mean": factor[mask.sum(-1) > 0].mean() if bool((mask.sum(-1) > 0).any()) else torch.tensor(1.0),
        }
        return keep * factor[:, None], metrics

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
