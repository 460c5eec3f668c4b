"""Which ratio gets clipped: per-token mixtures of the token and the sequence ratio (DHPO), a prefix-minimum
weight on the token ratio (MinPRO) and trajectory/token trust-region gates (FiberPO). All three are
reconstructed from their abstracts; their choices are parameters with guessed defaults.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.group_stats import group_index
from policylab.algo.objectives.policy_gradient import (
    clipped_surrogate,
    masked_max,
    masked_mean,
    ratio_metrics,
    token_entropy,
    token_log_ratio,
)
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

# --------------------------------------------------------------------------------------------------
# DHPO


def masked_seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """[B] (1/L_i) sum_t m*x (0 for empty rows)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def dhpo_mixed_ratios(log_ratio: Tensor, mask: Tensor, weight: Tensor, eps_token: tuple[float, float],
                      eps_seq: tuple[float, float], mix: str = "arithmetic") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DHPO's mixed ratio: r = w*rho + (1-w)*s and r^c = w*clip(rho) + (1-w)*clip(s) (or geometric in log space).

    rho = exp(d) per token; s_i = exp((1/L_i) sum_t m*d) keeps its true sequence gradient (s_i/L_i per token).
    Returns (r, r_clipped, rho, s[B,1]).
    """
    rho = torch.exp(log_ratio)
    log_s = masked_seq_mean(log_ratio, mask)[:, None]
    s = torch.exp(log_s)
    rho_c = rho.clamp(1 - eps_token[0], 1 + eps_token[1])
    s_c = s.clamp(1 - eps_seq[0], 1 + eps_seq[1])
    if mix == "arithmetic":
        r = weight * rho + (1 - weight) * s
        r_c = weight * rho_c + (1 - weight) * s_c
    elif mix == "geometric":
        r = torch.exp(weight * log_ratio + (1 - weight) * log_s)
        r_c = torch.exp(weight * torch.log(rho_c) + (1 - weight) * torch.log(s_c))
    else:
        raise ValueError(f"dhpo mix must be 'arithmetic' or 'geometric', got {mix!r}")
    return r, r_c, rho, s


DHPO_MIXINGS = ("entropy", "constant", "seq_minmax", "sigmoid_z")


def dhpo_token_weight(entropy: Tensor, mask: Tensor, mixing: str, constant: float,
                      entropy_max: Tensor, entropy_mean: Tensor, entropy_std: Tensor) -> Tensor:
    """w_{i,t} in [0,1] on the token branch: high-entropy "fork" tokens lean on token-level credit.

    entropy: H / max H over the rollout batch (spec default); constant: w = ``constant`` (0.5 = the paper's
    averaged mixing); seq_minmax: min-max of H within each sequence; sigmoid_z: sigmoid((H - mean)/std)
    with batch statistics.
    """
    if mixing == "constant":
        return torch.full_like(mask, float(constant), dtype=torch.float32)
    if mixing == "entropy":
        return (entropy / entropy_max.clamp(min=1e-8)).clamp(0, 1) * mask
    if mixing == "seq_minmax":
        big = torch.finfo(entropy.dtype).max
        lo = torch.where(mask > 0, entropy, torch.full_like(entropy, big)).min(-1, keepdim=True).values
        hi = torch.where(mask > 0, entropy, torch.full_like(entropy, -big)).max(-1, keepdim=True).values
        span = (hi - lo).clamp(min=1e-8)
        return ((entropy - lo) / span).clamp(0, 1) * mask
    if mixing == "sigmoid_z":
        return torch.sigmoid((entropy - entropy_mean) / entropy_std.clamp(min=1e-8)) * mask
    raise ValueError(f"dhpo mixing must be one of {', '.join(DHPO_MIXINGS)}, got {mixing!r}")


ENTROPY_MAX, ENTROPY_MEAN, ENTROPY_STD = "dhpo_entropy_max", "dhpo_entropy_mean", "dhpo_entropy_std"
for _name, _what in ((ENTROPY_MAX, "max"), (ENTROPY_MEAN, "mean"), (ENTROPY_STD, "unbiased std (1 for one token)")):
    declare_field(_name, per_row=False, shape="scalar", dtype="float", owner="objective 'dhpo'",
                  doc=f"{_what} of the collection-time token entropy over the rollout batch's valid tokens "
                      "(DHPO's entropy-mixing statistics)")


def _entropy_stats(entropy: Tensor, mask: Tensor) -> dict[str, Tensor]:
    valid = entropy[mask > 0]
    if valid.numel() == 0:
        valid = torch.zeros(1)
    std = valid.std() if valid.numel() > 1 else torch.tensor(1.0)
    return {ENTROPY_MAX: valid.max(), ENTROPY_MEAN: valid.mean(), ENTROPY_STD: std}


class DHPO:
    """DHPO (arXiv:2601.05607, Dynamic Hybrid Policy Optimization; reconstructed from the abstract): PPO's clipped
    surrogate j = min(r*A, r^c*A) on a per-token mixture of GRPO's token ratio and GSPO's sequence ratio,
    r = w*rho + (1-w)*s with both branches clipped in their own ranges, r^c = w*clip(rho) + (1-w)*clip(s).

    Library defaults (guessed; no public code): eps_token = (0.2, 0.28), eps_seq = (3e-4, 4e-4), mixing "entropy"
    (w = H / max H over the rollout batch, H the collection-time entropy), arithmetic mix. With entropy mixing
    it ``requires`` the collection-time ``entropy`` and its ``annotate`` hook provides the batch's entropy
    statistics (``dhpo_entropy_max/mean/std``, per-batch) once per rollout batch, so every micro-batch uses the same w.

    Shared test T-ONPOL does not hold per token with entropy mixing (hence the tag): on-policy the gradient on
    token t is -a*A*(w_t + mean_u(1 - w_u)), because the sequence branch spreads credit evenly over the
    sequence; its sum over a sequence equals REINFORCE's, and with constant w it is REINFORCE exactly.
    T-MICRO holds after ``annotate`` only (hence the tag): max H (the entropy mixing's normaliser) is a
    whole-rollout-batch statistic (group statistics are computed once per rollout batch), which the shared fixture,
    splitting groups without ``annotate``, cannot give; this family's tests check T-MICRO after ``annotate``.
    """

    def __init__(self, eps_token_low: float = 0.2, eps_token_high: float = 0.28, eps_seq_low: float = 3e-4,
                 eps_seq_high: float = 4e-4, mixing: str = "entropy", token_weight: float = 0.5, mix: str = "arithmetic"):
        if mixing not in DHPO_MIXINGS:
            raise ValueError(f"dhpo mixing must be one of {', '.join(DHPO_MIXINGS)}, got {mixing!r}")
        if mix not in ("arithmetic", "geometric"):
            raise ValueError(f"dhpo mix must be 'arithmetic' or 'geometric', got {mix!r}")
        if not 0.0 <= token_weight <= 1.0:
            raise ValueError(f"dhpo token_weight must be in [0, 1], got {token_weight}")
        self.eps_token = (eps_token_low, eps_token_high)
        self.eps_seq = (eps_seq_low, eps_seq_high)
        self.mixing, self.token_weight, self.mix = mixing, token_weight, mix

    def requires(self) -> tuple[str, ...]:
        return () if self.mixing == "constant" else ("entropy",)

    def provides(self) -> tuple[str, ...]:
        return () if self.mixing == "constant" else (ENTROPY_MAX, ENTROPY_MEAN, ENTROPY_STD)

    def annotate(self, rollouts: Rollouts, ctx=None) -> dict[str, Tensor]:
        """The entropy statistics of the whole rollout batch (none with constant mixing)."""
        if self.mixing == "constant":
            return {}
        if rollouts.entropy is None:
            raise ValueError("dhpo entropy mixing needs rollouts.entropy (the policy_entropy annotator provides it)")
        return _entropy_stats(rollouts.entropy.detach().float(), rollouts.completion_mask)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        adv = batch.seq_advantages()
        log_ratio = token_log_ratio(out, batch)
        if self.mixing == "constant":
            weight = torch.full_like(mask, float(self.token_weight))
        else:
            entropy = token_entropy(out, batch, "dhpo", prefer="collection")
            # batch-wide statistics from annotate; the batch's own when it did not run
            stats = _entropy_stats(entropy, mask)
            stats = {k: torch.as_tensor(batch.extras.get(k, v)) for k, v in stats.items()}
            weight = dhpo_token_weight(entropy, mask, self.mixing, self.token_weight, *stats.values())
        r, r_c, rho, s = dhpo_mixed_ratios(log_ratio, mask, weight.detach(), self.eps_token, self.eps_seq, self.mix)
        loss = -torch.minimum(r * adv, r_c * adv)
        metrics = ratio_metrics(rho, log_ratio, mask)
        rho_d, s_d = rho.detach(), s.detach()
        token_clipped = (rho_d < 1 - self.eps_token[0]) | (rho_d > 1 + self.eps_token[1])
        seq_clipped = ((s_d < 1 - self.eps_seq[0]) | (s_d > 1 + self.eps_seq[1])).expand_as(mask)
        metrics["dhpo/token_weight"] = masked_mean(weight, mask)
        metrics["dhpo/clipfrac_token"] = masked_mean(token_clipped.float(), mask)
        metrics["dhpo/clipfrac_seq"] = masked_mean(seq_clipped.float(), mask)
        metrics["dhpo/mixed_ratio"] = masked_mean(r.detach(), mask)
        return loss, metrics


register("objective", "dhpo", spec="arXiv:2601.05607 (DHPO; reconstructed from the abstract)",
         tags=("skip:T-ONPOL", "skip:T-MICRO"))(DHPO)

# --------------------------------------------------------------------------------------------------
# MinPRO


def prefix_min_ratio(ratio: Tensor, mask: Tensor) -> Tensor:
    """w_{i,t} = min_{u<t, m=1} rho_{i,u}, and 1 where no valid token precedes t (MinPRO's prefix weight)."""
    inf = torch.full_like(ratio, math.inf)
    valid_ratio = torch.where(mask > 0, ratio, inf)
    inclusive = torch.cummin(valid_ratio, dim=-1).values
    exclusive = torch.cat([inf[:, :1], inclusive[:, :-1]], dim=-1)
    return torch.where(torch.isinf(exclusive), torch.ones_like(ratio), exclusive)


@register("objective", "minpro", spec="arXiv:2601.22718 (MinPRO; reconstructed from the abstract)")
def minpro_loss(out: PolicyOutputs, batch: Rollouts, *, eps_low: float = 0.2, eps_high: float = 0.28,
                w_max: float | None = None) -> tuple[Tensor, dict]:
    """MinPRO (arXiv:2601.22718, Minimum Prefix Ratio): PPO's clipped surrogate weighted by the minimum of the token
    ratios strictly before t, j = min(w*rho*A, w*clip(rho)*A), w = sg(min_{u<t} rho_u).

    The prefix minimum replaces the exact but unstable prefix product prod_{u<t} rho_u (logged as
    ``minpro/log_prefix_gap``). Reconstructed: strictly preceding valid tokens, optional cap ``w_max``.
    """
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    weight = prefix_min_ratio(ratio.detach(), mask)
    if w_max is not None:
        weight = weight.clamp(max=w_max)
    surrogate, is_clipped, _ = clipped_surrogate(ratio, adv, eps_low, eps_high, None)
    loss = weight * surrogate
    # log of the exact prefix product prod_{u<t} rho_u, for the gap the minimum leaves
    valid_log = log_ratio.detach() * mask
    log_prefix = torch.cumsum(valid_log, dim=-1) - valid_log
    metrics = ratio_metrics(ratio, log_ratio, mask)
    metrics["clipfrac"] = masked_mean(is_clipped.float(), mask)
    metrics["minpro/weight_mean"] = masked_mean(weight, mask)
    metrics["minpro/weight_min"] = -masked_max(-weight, mask, empty=-1.0)
    metrics["minpro/weight_below_half"] = masked_mean((weight < 0.5).float(), mask)
    metrics["minpro/log_prefix_gap"] = masked_mean((log_prefix - torch.log(weight)).abs(), mask)
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# FiberPO


def censor_gate(x: Tensor, adv: Tensor, delta: float) -> Tensor:
    """FiberPO's censoring gate C(x; A, delta): 0 where the log-ratio aggregate x left the budget in A's direction, else 1.

    A>0 censors x > log(1+delta); A<0 censors x < log(1-delta) (PPO's sign-aware clip as a gate).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"fiberpo trust-region budget delta must be in (0, 1), got {delta}")
    out_high = (adv > 0) & (x > math.log1p(delta))
    out_low = (adv < 0) & (x < math.log1p(-delta))
    return (~(out_high | out_low)).float()


def _segment_token_mean(values: Tensor, mask: Tensor, segment: Tensor) -> Tensor:
    """Per-row token-mean of ``values`` over all valid tokens of the row's segment (group or domain)."""
    idx, k = group_index(segment)
    total = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, (values * mask).sum(-1))
    count = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, mask.sum(-1))
    return (total / count.clamp(min=1))[idx]


def _domain_ids(batch: Rollouts, key: str) -> Tensor:
    """Domain index per row from the task rows' ``key`` column."""
    if len(batch.rows) != batch.batch_size or any(key not in row for row in batch.rows):
        raise ValueError(f"fiberpo hierarchy 'group+domain' needs a {key!r} column in every task row (rows[i][{key!r}])")
    names = sorted({str(row[key]) for row in batch.rows})
    return torch.tensor([names.index(str(row[key])) for row in batch.rows])


FIBER_HIERARCHIES = ("none", "group", "group+domain")


def fiberpo_loss(out: PolicyOutputs, batch: Rollouts, *, delta_base: float = 0.05, delta_fiber: float = 0.2,
                 hierarchy: str = "none", delta_group: float = 0.02, delta_domain: float = 0.01,
                 domain_key: str = "domain") -> tuple[Tensor, dict]:
    """FiberPO (arXiv:2603.08239): j = g^B_i * g^F_{i,t} * rho_{i,t} * A; gates censor the trajectory aggregate and the residual.

    b_i = (1/L_i) sum_t m*log rho (base), u_{i,t} = log rho - b_i (fiber); g^B = C(b_i; A, delta_base),
    g^F = C(u; A, delta_fiber), gates without gradient. ``hierarchy`` adds levels above the trajectory
    (group aggregate c_g, domain aggregate), each gated on its residual w.r.t. the level above with its own
    delta; these levels are computed over the rows of ``batch``.
    """
    if hierarchy not in FIBER_HIERARCHIES:
        raise ValueError(f"fiberpo hierarchy must be one of {', '.join(FIBER_HIERARCHIES)}, got {hierarchy!r}")
    mask = batch.completion_mask
    adv = batch.seq_advantages()
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    lr = log_ratio.detach()
    base = masked_seq_mean(lr, mask)[:, None]
    gate = torch.ones_like(lr)
    level_above = torch.zeros_like(base)
    if hierarchy == "group+domain":
        domain_mean = _segment_token_mean(lr, mask, _domain_ids(batch, domain_key).to(lr.device))[:, None]
        gate = gate * censor_gate(domain_mean.expand_as(lr), adv, delta_domain)
        level_above = domain_mean
    if hierarchy in ("group", "group+domain"):
        group_mean = _segment_token_mean(lr, mask, batch.group.to(lr.device))[:, None]
        gate = gate * censor_gate((group_mean - level_above).expand_as(lr), adv, delta_group)
        level_above = group_mean
    base_gate = censor_gate((base - level_above).expand_as(lr), adv, delta_base)
    fiber_gate = censor_gate(lr - base, adv, delta_fiber)
    gate = gate * base_gate * fiber_gate
    loss = -gate * ratio * adv
    has_tokens = mask.sum(-1) > 0
    seq_censored = ((1 - base_gate) * mask).sum(-1) > 0
    residual = (lr - base)[mask > 0]
    metrics = ratio_metrics(ratio, log_ratio, mask)
    metrics["fiberpo/base_censored"] = (seq_censored & has_tokens).float().sum() / has_tokens.float().sum().clamp(min=1)
    metrics["fiberpo/fiber_censored"] = masked_mean((fiber_gate == 0).float(), mask)
    metrics["fiberpo/censored"] = masked_mean((gate == 0).float(), mask)
    metrics["fiberpo/abs_base"] = (base.squeeze(-1).abs() * has_tokens).sum() / has_tokens.float().sum().clamp(min=1)
    metrics["fiberpo/residual_std"] = residual.std() if residual.numel() > 1 else torch.tensor(0.0)
    return loss, metrics


class FiberPO:
    """FiberPO (arXiv:2603.08239, Fibration Policy Optimization): the ratio times A, gated by a trajectory (base) and a
    token-residual (fiber) trust region, each gate zero where its log-ratio aggregate left the budget in A's
    direction; see ``fiberpo_loss``.

    Reconstructed from the abstract (gate form = sign-aware censoring); defaults are guesses:
    delta_base 0.05, delta_fiber 0.2, hierarchy deltas 0.02 (group) and 0.01 (domain). With a hierarchy the
    group aggregate is taken from the current log-ratios, so the component asks the loop for micro-batches
    of whole groups (``needs_whole_groups``); the domain aggregate covers the domain's rows in the micro-batch.
    """

    def __init__(self, delta_base: float = 0.05, delta_fiber: float = 0.2, hierarchy: str = "none",
                 delta_group: float = 0.02, delta_domain: float = 0.01, domain_key: str = "domain"):
        if hierarchy not in FIBER_HIERARCHIES:
            raise ValueError(f"fiberpo hierarchy must be one of {', '.join(FIBER_HIERARCHIES)}, got {hierarchy!r}")
        for name, delta in (("delta_base", delta_base), ("delta_fiber", delta_fiber), ("delta_group", delta_group),
                            ("delta_domain", delta_domain)):
            if not 0.0 < delta < 1.0:
                raise ValueError(f"fiberpo {name} must be in (0, 1), got {delta}")
        self.params = dict(delta_base=delta_base, delta_fiber=delta_fiber, hierarchy=hierarchy,
                           delta_group=delta_group, delta_domain=delta_domain, domain_key=domain_key)

    @property
    def needs_whole_groups(self) -> bool:
        return self.params["hierarchy"] != "none"

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        return fiberpo_loss(out, batch, **self.params)


register("objective", "fiberpo", spec="arXiv:2603.08239 (FiberPO; reconstructed from the abstract)")(FiberPO)
