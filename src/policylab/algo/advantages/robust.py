"""Advantages built on robust or distribution-shaped statistics of the rewards: MC-GRPO's median/MAD baseline
with a dropped pivot, BNPO's Beta-density normalisation, RiskPO's Mixed-VaR over question bundles."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import group_sum, rewards_of
from policylab.algo.group_stats import group_index, group_mean_std, nan_to_zero
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

# --------------------------------------------------------------------------------------------------
# B1 MC-GRPO


def median_centred_advantages(rewards: Tensor, group: Tensor, *, scale: str = "mad", eps: float = 1e-3,
                              nonzero_rescale: bool = False) -> tuple[Tensor, Tensor]:
    """(A [B], pivot [B] bool) of MC-GRPO (B1) over groups of G+1 rollouts.

    m_g = median of the group (lower middle for an even size, as torch.median); the pivot is the lowest
    batch index with r == m_g; MAD_g = median_j |r_j - m_g| (pivot included); A = (r - m_g)/(MAD_g + eps)
    for ``scale="mad"``, (r - m_g)/(unbiased std + eps) for "std", r - m_g for "none".
    ``nonzero_rescale`` (GSM8K trainer): the non-zero advantages of a group are multiplied by
    (G+1)/#non-zero. Singleton groups get A = 0 and no pivot (nothing would be left to train);
    NaN rewards are left out of the statistics, get A = 0 and are never the pivot (a group with only
    NaN rewards gives up its first row as pivot, so every group still trains G rows).
    """
    if scale not in ("mad", "std", "none"):
        raise ValueError(f"mc_grpo scale must be 'mad', 'std' or 'none', got {scale!r}")
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    pivot = torch.zeros(rewards.shape[0], dtype=torch.bool)
    idx, k = group_index(group)
    for g in range(k):
        rows = (idx == g).nonzero().flatten()  # ascending batch order
        if rows.numel() < 2:
            continue
        r = rewards[rows].float()
        valid = ~torch.isnan(r)
        if not valid.any():
            pivot[rows[0]] = True
            continue
        median = r[valid].median()
        mad = (r[valid] - median).abs().median()
        if scale == "mad":
            denom = mad + eps
        elif scale == "std":
            denom = (r[valid].std() if int(valid.sum()) > 1 else torch.tensor(1.0)) + eps
        else:
            denom = torch.tensor(1.0)
        a = nan_to_zero((r - median) / denom)
        if nonzero_rescale:
            nonzero = a.abs() > 1e-6
            if nonzero.any():
                a = torch.where(nonzero, a * rows.numel() / nonzero.sum(), a)
        adv[rows] = a
        pivot[rows[(valid & (r == median)).nonzero().flatten()[0]]] = True
    return adv, pivot


MC_GRPO_ADVANTAGE = declare_field("mc_grpo_advantage", per_row=True, shape="[B]", dtype="float",
                                  owner="advantage 'mc_grpo'",
                                  doc="MC-GRPO advantage over all G+1 rollouts, before the pivot row was dropped")


@register("advantage", "mc_grpo", spec="arXiv:2601.22582 (median-centred GRPO, G+1 rollouts)")
class MCGRPOAdvantage:
    """MC-GRPO (arXiv:2601.22582): median-centred, MAD-scaled advantages over G+1 rollouts,
    A_i = (r_i - median_g r) / (MAD_g + eps); the median ("pivot") rollout is not trained.

    Set ``rollout.group_size`` to G+1. ``transform`` (a batch transform: it drops rows) computes the advantages
    over all G+1 rollouts of each group, stores them as ``mc_grpo_advantage`` and drops each group's pivot row,
    so the loss sees exactly G rows per prompt. Called on a batch without that field (evaluation) it centres on
    the median of the rows it is given and drops nothing (the spec's eval mode).
    ``scale``: "mad" (released code, default), "std" or "none" (the abstract only fixes the median centre).
    """

    requires = ("rewards",)
    provides = (MC_GRPO_ADVANTAGE,)

    def __init__(self, scale: str = "mad", eps: float = 1e-3, nonzero_rescale: bool = False):
        if scale not in ("mad", "std", "none"):
            raise ValueError(f"mc_grpo scale must be 'mad', 'std' or 'none', got {scale!r}")
        self.scale, self.eps, self.nonzero_rescale = scale, eps, nonzero_rescale
        self.last_metrics: dict[str, float] = {}

    def _compute(self, rollouts: Rollouts) -> tuple[Tensor, Tensor]:
        r = rewards_of(rollouts, "mc_grpo")
        adv, pivot = median_centred_advantages(r, rollouts.group, scale=self.scale, eps=self.eps,
                                               nonzero_rescale=self.nonzero_rescale)
        mean, _, _ = group_mean_std(r, rollouts.group)
        trained = ~pivot & ~torch.isnan(r)
        flips = torch.sign(adv) != torch.sign(nan_to_zero(r - mean))
        self.last_metrics = {
            "mc_grpo/frac_sign_flip": float(flips[trained].float().mean()) if trained.any() else 0.0,
            "mc_grpo/pivot_reward_mean": float(nan_to_zero(r[pivot]).mean()) if pivot.any() else 0.0,
            "mc_grpo/frac_zero_advantage": float((adv[~pivot] == 0).float().mean()) if (~pivot).any() else 0.0,
        }
        return adv, pivot

    @torch.no_grad()
    def transform(self, rollouts: Rollouts, ctx=None) -> Rollouts:
        """Advantages over the full G+1 groups, then the batch without each group's pivot row."""
        adv, pivot = self._compute(rollouts)
        extras = dict(rollouts.extras)
        extras[MC_GRPO_ADVANTAGE.name] = adv
        return rollouts.with_(extras=extras).select(~pivot)

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        stored = rollouts.extras.get(MC_GRPO_ADVANTAGE.name)
        if isinstance(stored, Tensor) and stored.shape == (rollouts.batch_size,):
            return stored
        adv, _ = self._compute(rollouts)
        return adv


# --------------------------------------------------------------------------------------------------
# B2 BNPO


def beta_pdf(p: Tensor, alpha: float, beta: float) -> Tensor:
    """Beta(alpha, beta) density at p in [0,1]; xlogy keeps 0^0 = 1 on the boundary (alpha or beta = 1)."""
    p = p.double()
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    return torch.exp(torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm)


def beta_from_moments(m: float, v: float) -> tuple[float, float]:
    """B2 step 4: a = (m(1-m)/v - 1) m, b = (m(1-m)/v - 1)(1-m); alpha = max(1, 1 + a/3), beta = max(1, 1 + b/3).

    v = 0 (every group has the same success rate) would divide by zero in the released code; the spec's
    guard is alpha = beta = 1 (uniform density, weight 1).
    """
    if v <= 0:
        return 1.0, 1.0
    common = m * (1 - m) / v - 1
    return max(1.0, 1 + common * m / 3), max(1.0, 1 + common * (1 - m) / 3)


def group_success_rates(r01: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """(p_g per row [B], p_g per group [K]): group means of non-NaN rewards; singletons p_g := 0 (B2 step 2)."""
    idx, k = group_index(group)
    valid = ~torch.isnan(r01)
    count = group_sum(valid.double(), idx, k)
    p = group_sum(nan_to_zero(r01), idx, k) / count.clamp(min=1)
    p = torch.where(count <= 1, torch.zeros_like(p), p)
    return p[idx], p[count > 0]


def bnpo_component_advantage(r01: Tensor, group: Tensor, alpha: float, beta: float, weight_cap: float = 1e6) -> Tensor:
    """B2 step 5: A_i = clamp(1/BetaPDF(p_g), 0, cap)·(r_i - p_g); the product is taken after clamping, so
    p_g in {0,1} (pdf 0, weight = cap, r - p = 0) gives 0, never NaN."""
    p_row, _ = group_success_rates(r01, group)
    weight = (1.0 / beta_pdf(p_row, alpha, beta)).clamp(0, weight_cap)
    return nan_to_zero((weight * (r01.double() - p_row)).float())


@register("advantage", "bnpo", spec="arXiv:2506.02864 (Beta normalisation)", tags=("skip:A-SHIFT",))
class BNPOAdvantage:
    """BNPO (arXiv:2506.02864): A_i = (r_i - p_g) / BetaPDF(p_g; alpha, beta), the group-success-rate-centred
    reward divided by the density of a Beta distribution fitted to the batch's group success rates p_g.

    Each step fits m = mean_g p_g, v = unbiased var_g p_g (one group: m := 0, v := 1, i.e. Dr. GRPO) and
    alpha, beta by moments. ``decompose`` (use_advantage_decomposition) does this per reward component
    (``components``: names in rollouts.reward_components; default all but the derived "accuracy") and
    averages. Rewards are mapped from [r_min, r_max] to [0, 1]; values outside that range are an error (p_g is
    a success rate, so a reward offset is not neutral: tagged skip:A-SHIFT).
    State: the last (m, v, alpha, beta) per component, for metrics and checkpoints. ``momentum`` > 0 is our
    extension (not in the paper): m and v become EMAs across steps, so the state changes the advantages;
    the default 0 is the released behaviour (each step's Beta comes from its own batch only).
    """

    requires = ("rewards", "reward_components")

    def __init__(self, r_min: float = 0.0, r_max: float = 1.0, decompose: bool = False,
                 components: list[str] | None = None, momentum: float = 0.0, weight_cap: float = 1e6):
        if r_max <= r_min:
            raise ValueError(f"bnpo needs r_max > r_min, got r_min={r_min}, r_max={r_max}")
        if not 0 <= momentum < 1:
            raise ValueError(f"bnpo momentum must be in [0, 1), got {momentum}")
        self.r_min, self.r_max, self.decompose, self.components = r_min, r_max, decompose, components
        self.momentum, self.weight_cap = momentum, weight_cap
        self.fits: dict[str, dict[str, float]] = {}  # component -> {m, v, alpha, beta}
        self.last_metrics: dict[str, float] = {}

    def _signals(self, rollouts: Rollouts) -> dict[str, Tensor]:
        if not self.decompose:
            return {"total": rewards_of(rollouts, "bnpo")}
        names = self.components or [n for n in rollouts.reward_components if n != "accuracy"]
        missing = [n for n in names if n not in rollouts.reward_components]
        if missing or not names:
            raise ValueError(f"bnpo decompose: reward components {missing or names} not in rollouts.reward_components "
                             f"(have {sorted(rollouts.reward_components)})")
        return {n: rollouts.reward_components[n].float() for n in names}

    def _fit(self, name: str, p_groups: Tensor) -> tuple[float, float]:
        if p_groups.numel() >= 2:
            m, v = float(p_groups.mean()), float(p_groups.var())
        else:
            m, v = 0.0, 1.0
        previous = self.fits.get(name)
        if self.momentum and previous is not None:
            if p_groups.numel() < 2:  # a single group carries no spread: keep the running fit
                m, v = previous["m"], previous["v"]
            else:
                m = self.momentum * previous["m"] + (1 - self.momentum) * m
                v = self.momentum * previous["v"] + (1 - self.momentum) * v
        alpha, beta = beta_from_moments(m, v)
        self.fits[name] = {"m": m, "v": v, "alpha": alpha, "beta": beta}
        return alpha, beta

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        parts = []
        for name, raw in self._signals(rollouts).items():
            r01 = (raw - self.r_min) / (self.r_max - self.r_min)
            finite = r01[~torch.isnan(r01)]
            if finite.numel() and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
                raise ValueError(f"bnpo: reward {name!r} has values outside [r_min, r_max] = [{self.r_min}, {self.r_max}]")
            _, p_groups = group_success_rates(r01, rollouts.group)
            alpha, beta = self._fit(name, p_groups)
            parts.append(bnpo_component_advantage(r01.clamp(0, 1), rollouts.group, alpha, beta, self.weight_cap))
        self.last_metrics = {f"bnpo/{n}/{key}": value for n, fit in self.fits.items() for key, value in fit.items()}
        return torch.stack(parts).mean(0)

    def state_dict(self) -> dict:
        return {"fits": {n: dict(f) for n, f in self.fits.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.fits = {n: dict(f) for n, f in state.get("fits", {}).items()}


# --------------------------------------------------------------------------------------------------
# B3 RiskPO

QUANTILE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95, the tracked levels


def mixed_var_paper_advantages(scores: Tensor, low: float, high: float, w_mix: float, *, eps: float = 1e-6,
                               normalise_by_std: bool = True, a: float | None = None, b: float | None = None) -> Tensor:
    """B3 steps 2-5 for one bundle: per-paper advantage from bundle scores S [K] (natural baseline).

    a, b = quantile(S, low/high) (linear, as torch.quantile) unless given (tracked mode);
    A^R = ((S-a)^+ - (S-b)^+ + (a-b)) / (high - low + eps)  (divides by the quantile-level gap, as released);
    A^C = -(a - S)^+ / (low + eps);  A = (w A^C + A^R)/(w + 1), then / (unbiased std(S) + eps).
    One paper: a = b = S_0 and std := 1, so A = 0. Every value is <= 0 (the ordering carries the signal).
    """
    s = scores.double()
    if s.numel() == 1:
        return torch.zeros_like(scores, dtype=torch.float32)
    if a is None:
        a = float(torch.quantile(s, low))
    if b is None:
        b = float(torch.quantile(s, high))
    rvar = ((s - a).clamp(min=0) - (s - b).clamp(min=0) + (a - b)) / (high - low + eps)
    cvar = -(a - s).clamp(min=0) / (low + eps)
    adv = (w_mix * cvar + rvar) / (w_mix + 1)
    if normalise_by_std:
        adv = adv / (s.std() + eps)
    return adv.float()


def bundle_papers(group: Tensor, bundle_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(bundle id [B], rank k of the row within its question [B], question id [B]) for B3 step 1.

    Questions are the dense group ids in ascending group order; questions q*bundle_size ... share a bundle;
    a row's rank is its position among its question's rows in batch order.
    """
    question, k = group_index(group)
    rank = torch.zeros_like(question)
    for q in range(k):
        rows = (question == q).nonzero().flatten()
        rank[rows] = torch.arange(rows.numel())
    return question // bundle_size, rank, question


def riskpo_credit(paper_adv: Tensor, rewards: Tensor, question: Tensor, paper: Tensor, mode: str, eps: float) -> Tensor:
    """B3 step 6: spread each paper's advantage [B] (already gathered per row) over its responses.

    uniform: A_k; score: 0.5 A_k if r > 0 else 1.5 A_k; std: A_k/(sigma_q + eps) with sigma_q := 1 when
    <= 1e-3 or undefined; sum-mean: A_k (r - mu_q) / sum over the paper of (r - mu_q'), or A_k/Q when that
    sum is within 1e-6 of 0 (Q = questions in the paper).
    """
    r = nan_to_zero(rewards)
    if mode == "uniform":
        return paper_adv
    if mode == "score":
        return torch.where(r > 0, 0.5 * paper_adv, 1.5 * paper_adv)
    mean, std, count = group_mean_std(r, question)
    if mode == "std":
        sigma = torch.where((std <= 1e-3) | (count <= 1), torch.ones_like(std), std)
        return paper_adv / (sigma + eps)
    if mode == "sum-mean":
        centred = (r - torch.where(count <= 1, r, mean)).double()  # a singleton question has mean r_q
        pid, kp = group_index(paper)
        total = group_sum(centred, pid, kp)[pid]
        size = group_sum(torch.ones_like(centred), pid, kp)[pid]
        share = torch.where(total.abs() > 1e-6, centred / total.where(total.abs() > 1e-6, torch.ones_like(total)), 1 / size)
        return (paper_adv.double() * share).float()
    raise ValueError(f"riskpo credit must be 'uniform', 'score', 'std' or 'sum-mean', got {mode!r}")


@register("advantage", "riskpo", spec="arXiv:2510.00911 (Mixed-VaR over question bundles)", tags=("skip:A-PERM",))
class RiskPOAdvantage:
    """RiskPO (arXiv:2510.00911): Mixed-VaR advantages of bundle scores, credited back to each response: the
    paper advantage is (w·A^CVaR + A^RVaR)/(w + 1) of the bundle score S_k against its low/high quantiles.

    A bundle is ``bundle_size`` consecutive questions (prompt groups in ascending id order); paper k holds
    the k-th response of each question (by rollout order, as in the paper: reordering rows regroups the papers,
    so the advantage depends on row order by definition; tagged skip:A-PERM) and scores S_k = sum of their rewards. Rows beyond the bundle's
    smallest group size belong to no paper and get 0, as do failed (NaN) rows, whose reward counts as 0
    in their paper's score. ``quantile_mode``: "empirical" (per-bundle quantiles: the released trainer's
    effective behaviour, default) or "tracked" (quantiles on the 0.05..0.95 grid of all bundle scores,
    updated after each step by pinball-loss SGD with ``lr_q``; initialised from the first batch).
    """

    requires = ("rewards",)

    def __init__(self, quantile_low: float = 0.2, quantile_high: float = 0.9, w_mix: float = 1.5, bundle_size: int = 5,
                 credit: str = "std", normalise_by_std: bool = True, eps: float = 1e-6,
                 quantile_mode: str = "empirical", lr_q: float = 0.1):
        if not 0 < quantile_low < quantile_high < 1:
            raise ValueError(f"riskpo needs 0 < quantile_low < quantile_high < 1, got {quantile_low}, {quantile_high}")
        if bundle_size < 1:
            raise ValueError(f"riskpo bundle_size must be >= 1, got {bundle_size}")
        if credit not in ("uniform", "score", "std", "sum-mean"):
            raise ValueError(f"riskpo credit must be 'uniform', 'score', 'std' or 'sum-mean', got {credit!r}")
        if quantile_mode not in ("empirical", "tracked"):
            raise ValueError(f"riskpo quantile_mode must be 'empirical' or 'tracked', got {quantile_mode!r}")
        if quantile_mode == "tracked":
            for level in (quantile_low, quantile_high):
                if not any(abs(level - g) < 1e-9 for g in QUANTILE_GRID):
                    raise ValueError(f"riskpo tracked quantiles live on the grid {QUANTILE_GRID}; {level} is not on it")
        self.low, self.high, self.w_mix, self.bundle_size = quantile_low, quantile_high, w_mix, bundle_size
        self.credit, self.normalise_by_std, self.eps = credit, normalise_by_std, eps
        self.quantile_mode, self.lr_q = quantile_mode, lr_q
        self.tracked: Tensor | None = None  # [19] tracked quantiles of bundle scores
        self.last_metrics: dict[str, float] = {}

    def _tracked_value(self, level: float) -> float:
        return float(self.tracked[[abs(level - g) < 1e-9 for g in QUANTILE_GRID].index(True)])

    def _papers(self, rollouts: Rollouts, filled: Tensor):
        """Per bundle: (rows of the bundle that belong to a paper [B] bool, their paper index, scores S [K])."""
        bundle, rank, question = bundle_papers(rollouts.group, self.bundle_size)
        out = []
        for bid in bundle.unique().tolist():
            rows = bundle == bid
            counts = torch.bincount(question[rows])
            papers = int(counts[counts > 0].min())
            rows_in = rows & (rank < papers)
            scores = torch.zeros(papers, dtype=torch.float64).index_add_(0, rank[rows_in], filled[rows_in].double())
            out.append((bid, rows_in, rank, scores))
        return out, question

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "riskpo")
        papers, question = self._papers(rollouts, nan_to_zero(r))
        all_scores = torch.cat([s for *_, s in papers]) if papers else torch.zeros(0, dtype=torch.float64)
        grid = torch.tensor(QUANTILE_GRID, dtype=torch.float64)
        fresh = self.quantile_mode == "tracked" and self.tracked is None and all_scores.numel() > 0
        if fresh:
            self.tracked = torch.quantile(all_scores, grid)
        paper_adv = torch.zeros_like(r)
        in_paper = torch.zeros_like(r, dtype=torch.bool)
        paper_id = torch.full_like(question, -1)
        stride = int(max((rank.max() for _, _, rank, _ in papers), default=torch.tensor(0))) + 1
        for bid, rows_in, rank, scores in papers:
            a = b = None
            if self.quantile_mode == "tracked":
                a, b = self._tracked_value(self.low), self._tracked_value(self.high)
            adv = mixed_var_paper_advantages(scores, self.low, self.high, self.w_mix, eps=self.eps,
                                             normalise_by_std=self.normalise_by_std, a=a, b=b)
            paper_adv[rows_in] = adv[rank[rows_in]]
            in_paper |= rows_in
            paper_id[rows_in] = bid * stride + rank[rows_in]
        credited = riskpo_credit(paper_adv, r, question, paper_id, self.credit, self.eps)
        self._log(all_scores)
        if self.quantile_mode == "tracked" and not fresh and all_scores.numel():
            # pinball-loss SGD on every grid level: grad = -(level - P(S < q)); applied after this step's use
            below = (all_scores[None, :] < self.tracked[:, None]).double().mean(-1)
            self.tracked = self.tracked + self.lr_q * (grid - below)
        return torch.where(in_paper & ~torch.isnan(r), credited, torch.zeros_like(credited))

    def _log(self, scores: Tensor) -> None:
        if scores.numel() == 0:
            self.last_metrics = {}
            return
        a, b = float(torch.quantile(scores, self.low)), float(torch.quantile(scores, self.high))
        tail, middle = scores[scores <= a], scores[(scores >= a) & (scores <= b)]
        cvar, rvar = float(tail.mean()), (float(middle.mean()) if middle.numel() else a)
        self.last_metrics = {"riskpo/cvar": cvar, "riskpo/rvar": rvar,
                             "riskpo/mvar": (self.w_mix * cvar + rvar) / (self.w_mix + 1),
                             "riskpo/frac_below_low_quantile": float((scores < a).double().mean())}
        if self.tracked is not None:
            self.last_metrics["riskpo/tracked_low"] = self._tracked_value(self.low)
            self.last_metrics["riskpo/tracked_high"] = self._tracked_value(self.high)

    def state_dict(self) -> dict:
        return {"tracked": None if self.tracked is None else self.tracked.tolist()}

    def load_state_dict(self, state: dict) -> None:
        tracked = state.get("tracked")
        self.tracked = None if tracked is None else torch.tensor(tracked, dtype=torch.float64)
