"""Preference-style objectives: TRPA (arXiv:2504.04524), CoPG (arXiv:2406.19185), KTO (arXiv:2402.01306),
DPO (arXiv:2305.18290), and the online pair construction (a pure function from scored group rollouts to
(chosen, rejected) pairs).

All four are sequence-level losses. Each returns the per-token loss ``s * m / L_i`` (sequence_level.py),
written for the ``seq-mean-token-sum`` aggregation (``aggregates``) so that the aggregated value is the spec's
mean over pairs/examples, and (except KTO) cuts micro-batches at prompt boundaries (``needs_whole_groups``:
pairs live inside a prompt group). They ``require`` ``ref_logp`` (the built-in reference scorer) and
``pref_label``: offline preference data (jsonl with prompt/chosen/rejected; ``policylab.tasks.pairs``) is turned
into two rows per prompt by the ``offline_pairs`` batch transform, with ``pref_label`` = +1 (chosen) / -1
(rejected); rows without an offline label carry 0 and pairs come from the rewards. KTO's batch pass (its
reference point) is model-driving and lives with its registered class in ``policylab.annotate.mismatched_kl``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.algo.objectives.classification import labels_from_rewards
from policylab.algo.objectives.policy_gradient import masked_mean, old_logp_of
from policylab.algo.objectives.sequence_level import (
    SEQUENCE_LEVEL_AGGREGATE,
    seq_mean,
    seq_sum,
    spread_batch_loss,
    spread_row_losses,
)
from policylab.algo.regularizers.divergence import kl_estimate
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

PAIR_MODES = ("best_worst", "all", "correct_incorrect")


# ---------------------------------------------------------------------------------------------------
# pair construction


def pairs_within_groups(group: Tensor, better: Tensor) -> Tensor:
    """[P,2] (winner, loser) index pairs of rows in the same group with ``better[i, j]`` True."""
    same = group[:, None] == group[None, :]
    return (same & better).nonzero()


def preference_pairs(rewards: Tensor, group: Tensor, *, mode: str = "best_worst", usable: Tensor | None = None,
                     lengths: Tensor | None = None, threshold: float = 0.5) -> Tensor:
    """[P,2] (chosen, rejected) row indices from scored group rollouts (VerIPO-style, reconstructed).

    ``best_worst``: one pair per prompt, the highest against the lowest reward (only if they differ); ties for
    chosen go to the longest completion when ``lengths`` is given (VerIPO prefers the longer reflective CoT),
    other ties to the first row. ``all``: every same-prompt pair with r_i > r_j. ``correct_incorrect``: every
    correct (r > threshold) x incorrect pair. NaN rewards and rows not ``usable`` never enter a pair.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode must be one of {PAIR_MODES}, got {mode!r}")
    r = rewards.float()
    ok = ~torch.isnan(r) if usable is None else usable & ~torch.isnan(r)
    r0 = torch.nan_to_num(r, nan=0.0)
    valid_pair = ok[:, None] & ok[None, :]
    if mode == "all":
        return pairs_within_groups(group, valid_pair & (r0[:, None] > r0[None, :]))
    if mode == "correct_incorrect":
        correct = r0 > threshold
        return pairs_within_groups(group, valid_pair & correct[:, None] & ~correct[None, :])
    pairs = []
    tie_break = torch.zeros_like(r0) if lengths is None else lengths.float() / (lengths.float().max() + 1) * 1e-6
    for g in torch.unique(group):
        rows = ((group == g) & ok).nonzero().flatten()
        if rows.numel() < 2:
            continue
        rg = r0[rows]
        if rg.max() <= rg.min():
            continue
        best = rows[torch.argmax(torch.where(rg == rg.max(), tie_break[rows], torch.full_like(rg, -1.0)))]
        worst = rows[torch.argmax((rg == rg.min()).float())]
        pairs.append(torch.stack([best, worst]))
    return torch.stack(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)


def labelled_pairs(label: Tensor, group: Tensor, usable: Tensor | None = None) -> Tensor:
    """[P,2] every chosen (label +1) x rejected (label -1) pair of rows of the same prompt."""
    ok = torch.ones_like(label, dtype=torch.bool) if usable is None else usable
    chosen, rejected = (label > 0) & ok, (label < 0) & ok
    return pairs_within_groups(group, chosen[:, None] & rejected[None, :])


def usable_rows(batch: Rollouts) -> Tensor:
    return batch.completion_mask.sum(-1) > 0


def offline_labels(batch: Rollouts) -> Tensor | None:
    """extras["pref_label"] when the batch holds offline pair rows (some label != 0), else None."""
    label = batch.extras.get("pref_label")
    if label is None or not bool((torch.as_tensor(label) != 0).any()):
        return None
    return torch.as_tensor(label)


def pairs_for(batch: Rollouts, mode: str, threshold: float = 0.5) -> Tensor:
    """Offline pairs from the pair rows' labels when present, else online pairs from the rewards."""
    usable = usable_rows(batch)
    label = offline_labels(batch)
    if label is not None:
        return labelled_pairs(label, batch.group, usable)
    if batch.rewards is None:
        raise ValueError("preference pairs need rollouts.rewards or extras['pref_label']")
    return preference_pairs(batch.rewards, batch.group, mode=mode, usable=usable, lengths=batch.completion_mask.sum(-1),
                            threshold=threshold)


def seq_log_ratio_to_ref(out: PolicyOutputs, batch: Rollouts, objective: str) -> tuple[Tensor, Tensor]:
    """([B] sum_t m*logp, [B] sum_t m*ref_logp)."""
    if batch.ref_logp is None:
        raise ValueError(f"objective {objective!r} needs reference log-probs (rollouts.ref_logp)")
    mask = batch.completion_mask
    return seq_sum(out.logp, mask), seq_sum(batch.ref_logp.to(out.logp.device), mask)


class _SequenceLevel:
    """Declarations shared by the sequence-level preference losses (see the module docstring)."""

    name = "?"
    requires = ("rewards", "ref_logp", "pref_label")
    aggregates = (SEQUENCE_LEVEL_AGGREGATE,)  # the recipe aggregation these losses are written for
    needs_whole_groups = True


# ---------------------------------------------------------------------------------------------------
# DPO


def dpo_pair_losses(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                    beta: float) -> tuple[Tensor, Tensor]:
    """-log sigmoid(beta * [(logp_w - ref_w) - (logp_l - ref_l)]) per pair (DPO eq. 7) and the margin in brackets."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin), margin


class DpoObjective(_SequenceLevel):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), as VerIPO / IPO-safety use it.

    In words: for each (chosen, rejected) pair, the loss is -log sigmoid of beta times how much more the policy
    raised the chosen response's log-likelihood over the reference than the rejected one's:
    L = mean over pairs of -log sigmoid(beta*[(logp_w - ref_w) - (logp_l - ref_l)]) (+ ``sft_weight`` * NLL(y_w)/|y_w|,
    default 0). Sequence log-probs are token sums.

    Pairs: offline pair rows (``pref_label`` +1/-1, from the ``pairs`` / ``arithmetic_pairs`` tasks through the
    ``offline_pairs`` transform) or online from the rollouts' rewards with ``pairs`` = best_worst (default;
    reconstructed VerIPO choice) | all | correct_incorrect (:func:`preference_pairs`). Reference = the policy at the
    start of the run (the DPO phase). Per-token loss: the batch mean spread with weight 1/L_i (``aggregates``:
    seq-mean-token-sum); whole prompts per micro-batch (``needs_whole_groups``).
    Shared-test tags: T-ONPOL (a preference loss, not REINFORCE with batch.advantages) and T-MICRO (pairs couple rows).
    """

    name = "dpo"

    def __init__(self, *, beta: float = 0.1, sft_weight: float = 0.0, pairs: str = "best_worst"):
        if pairs not in PAIR_MODES:
            raise ValueError(f"dpo: pairs must be one of {PAIR_MODES}, got {pairs!r}")
        self.beta, self.sft_weight, self.pairs = beta, sft_weight, pairs

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        logp_seq, ref_seq = seq_log_ratio_to_ref(out, batch, self.name)
        pairs = pairs_for(batch, self.pairs).to(logp_seq.device)
        w, l = pairs[:, 0], pairs[:, 1]
        pair_loss, margin = dpo_pair_losses(logp_seq[w], logp_seq[l], ref_seq[w], ref_seq[l], self.beta)
        if self.sft_weight:
            pair_loss = pair_loss - self.sft_weight * seq_mean(out.logp, mask)[w]
        total = (pair_loss.sum() / max(len(pairs), 1)) + 0.0 * logp_seq.sum()
        m = margin.detach()
        metrics = {
            "dpo/loss": total.detach(),
            "dpo/pairs": torch.tensor(float(len(pairs))),
            "dpo/reward_accuracy": (m > 0).float().mean() if len(pairs) else torch.tensor(0.0),
            "dpo/margin": (self.beta * m).mean() if len(pairs) else torch.tensor(0.0),
            "dpo/logp_chosen": logp_seq.detach()[w].mean() if len(pairs) else torch.tensor(0.0),
            "dpo/logp_rejected": logp_seq.detach()[l].mean() if len(pairs) else torch.tensor(0.0),
        }
        return spread_batch_loss(total, mask), metrics


register("objective", "dpo", spec="arXiv:2305.18290 eq. 7 (DPO loss)", tags=("skip:T-ONPOL", "skip:T-MICRO"))(DpoObjective)


# ---------------------------------------------------------------------------------------------------
# KTO


def kto_losses(log_ratio: Tensor, desirable: Tensor, reference_point: Tensor, *, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """Per-example KTO loss: desirable lambda_D*(1 - sigmoid(beta*(r - z0))), undesirable
    lambda_U*(1 - sigmoid(beta*(z0 - r))), r = logp_seq - ref_logp_seq; z0 is detached here."""
    z0 = reference_point.detach()
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio))))


def mismatched_partners(group: Tensor) -> Tensor:
    """[B] for each row, the next row (cyclically) that belongs to another prompt; -1 if there is none.

    TRL shifts completions by one within the batch; in RLVR a prompt's G rows sit next to each other, so a plain
    shift would mostly pair a prompt with its own completion. Skipping same-prompt rows is our reconstruction.
    """
    b = group.shape[0]
    partner = torch.full((b,), -1, dtype=torch.long)
    for i in range(b):
        for step in range(1, b):
            j = (i + step) % b
            if group[j] != group[i]:
                partner[i] = j
                break
    return partner


class KtoLoss(_SequenceLevel):
    """KTO's loss (Ethayarajh et al. 2024, arXiv:2402.01306; standard TRL loss); the registered objective ``kto``
    (policylab.annotate.mismatched_kl) adds the batch pass that estimates the reference point.

    In words: a prospect-theory value of each example's implicit reward r = logp_seq - ref_logp_seq around a
    reference point z0 (no gradient): desirable examples are pushed above z0, undesirable ones below it, each
    through a sigmoid (:func:`kto_losses`); L = mean over labelled examples.
    Labels: offline ``pref_label`` (+1 desirable, -1 undesirable) or, online, desirable iff reward >
    ``correct_threshold`` (the rollout met its objective; CONSCIENTIA labelling reconstructed).
    Reference point: ``mismatched`` (spec/TRL: extras ``kto_z0`` from the batch pass), ``batch`` = max(0, mean
    log-ratio of the micro-batch's own completions; an on-policy estimate of KL(pi || ref), ours), ``zero``.
    Without the batch pass (a bare call) ``mismatched`` falls back to the ``batch`` estimate.
    Per-token loss: each labelled row carries its loss x (usable rows / labelled rows) (extras ``kto_row_scale``,
    counted over the whole rollout batch by the batch pass; else over the rows seen) spread with weight 1/L_i
    (``aggregates``: seq-mean-token-sum). The loss is per example, so micro-batching is exact after the batch pass.
    """

    name = "kto"
    needs_whole_groups = False

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference_point: str = "mismatched", correct_threshold: float = 0.5):
        if reference_point not in ("mismatched", "batch", "zero"):
            raise ValueError(f"kto: reference_point must be 'mismatched', 'batch' or 'zero', got {reference_point!r}")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.reference_point, self.correct_threshold = reference_point, correct_threshold

    def labels(self, batch: Rollouts) -> tuple[Tensor, Tensor]:
        """(desirable [B], labelled [B]) from the offline pair labels or from the rewards."""
        usable = usable_rows(batch)
        label = offline_labels(batch)
        if label is not None:
            return label > 0, (label != 0) & usable
        return labels_from_rewards(batch, self.correct_threshold)

    def row_scale(self, batch: Rollouts) -> Tensor:
        """usable rows / labelled rows of ``batch`` (the normaliser that makes the mean over labelled examples)."""
        _, labelled = self.labels(batch)
        return usable_rows(batch).sum().clamp(min=1) / labelled.sum().clamp(min=1)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        logp_seq, ref_seq = seq_log_ratio_to_ref(out, batch, self.name)
        log_ratio = logp_seq - ref_seq
        usable = usable_rows(batch).to(log_ratio.device)
        desirable, labelled = (x.to(log_ratio.device) for x in self.labels(batch))
        z0 = self.reference_point_value(batch, log_ratio, labelled)
        loss = kto_losses(log_ratio, desirable, z0, beta=self.beta, desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight) * labelled
        n_labelled = labelled.sum().clamp(min=1)
        row_scale = batch.extras.get("kto_row_scale")
        if row_scale is None:  # bare call: counted over the rows seen
            row_scale = usable.sum().clamp(min=1) / n_labelled
        row_loss = loss * torch.as_tensor(row_scale, device=log_ratio.device)
        r = (self.beta * log_ratio).detach()
        des, und = desirable & labelled, ~desirable & labelled
        metrics = {
            "kto/loss": loss.detach().sum() / n_labelled,
            "kto/kl": z0.detach().float(),
            "kto/rewards_chosen": r[des].mean() if des.any() else torch.tensor(0.0),
            "kto/rewards_rejected": r[und].mean() if und.any() else torch.tensor(0.0),
            "kto/desirable_frac": des.float().sum() / n_labelled,
        }
        return spread_row_losses(row_loss, mask), metrics

    def reference_point_value(self, batch: Rollouts, log_ratio: Tensor, labelled: Tensor) -> Tensor:
        if self.reference_point == "zero":
            return torch.zeros((), device=log_ratio.device)
        stored = batch.extras.get("kto_z0") if self.reference_point == "mismatched" else None
        if stored is not None:
            return torch.as_tensor(stored, dtype=log_ratio.dtype, device=log_ratio.device)
        usable = usable_rows(batch).to(log_ratio.device)
        if not usable.any():
            return torch.zeros((), device=log_ratio.device)
        return log_ratio.detach()[usable].mean().clamp(min=0)


# ---------------------------------------------------------------------------------------------------
# CoPG


def copg_pair_losses(reward_i: Tensor, reward_j: Tensor, log_ratio_i: Tensor, log_ratio_j: Tensor, beta: float) -> Tensor:
    """(R_beta(y) - R_beta(y'))^2 with R_beta = R - beta*(logp_seq - ref_logp_seq) (CoPG, reconstructed)."""
    gap = (reward_i - beta * log_ratio_i) - (reward_j - beta * log_ratio_j)
    return gap**2


class CopgObjective(_SequenceLevel):
    """CoPG (Contrastive Policy Gradient; Flet-Berliac et al. 2024, arXiv:2406.19185; reconstructed from the
    abstract and a summary).

    In words: for every unordered pair of responses to the same prompt, the squared difference of their
    KL-regularised rewards R_beta = R - beta*(logp_seq - ref_logp_seq) (all G(G-1)/2 pairs, NaN rewards excluded):
    l = (R_beta(y) - R_beta(y'))^2; L = mean over pairs. No importance ratio: the fixed point is
    logp - ref = R/beta + c(x). The overall scale of the loss is uncertain in the spec (absorbed by the learning rate).
    Per-token loss: the batch mean spread with weight 1/L_i (``aggregates``: seq-mean-token-sum); whole prompts per
    micro-batch (``needs_whole_groups``). Offline pair rows (``offline_pairs``) train with their 1/0 rewards.
    Shared-test tags: T-ONPOL (not REINFORCE with batch.advantages), T-ZEROADV (equal rewards still pull the
    log-ratios of a prompt together: the regularised fixed point, by design), T-MICRO (pairs couple rows).
    """

    name = "copg"

    def __init__(self, *, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"copg: beta must be > 0, got {beta}")
        self.beta = beta

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        logp_seq, ref_seq = seq_log_ratio_to_ref(out, batch, self.name)
        log_ratio = logp_seq - ref_seq
        if batch.rewards is None:
            raise ValueError("copg needs rollouts.rewards")
        reward = batch.rewards.float().to(log_ratio.device)
        ok = usable_rows(batch).to(log_ratio.device) & ~torch.isnan(reward)
        index = torch.arange(len(reward), device=log_ratio.device)
        pairs = pairs_within_groups(batch.group.to(log_ratio.device),
                                    ok[:, None] & ok[None, :] & (index[:, None] < index[None, :]))
        i, j = pairs[:, 0], pairs[:, 1]
        r = torch.nan_to_num(reward, nan=0.0)
        pair_loss = copg_pair_losses(r[i], r[j], log_ratio[i], log_ratio[j], self.beta)
        total = pair_loss.sum() / max(len(pairs), 1) + 0.0 * logp_seq.sum()
        implicit = (self.beta * log_ratio).detach()
        ordered = ((implicit[i] - implicit[j]) * (r[i] - r[j]) > 0)[r[i] != r[j]]
        metrics = {
            "copg/loss": total.detach(),
            "copg/pairs": torch.tensor(float(len(pairs))),
            "copg/abs_log_ratio": log_ratio.detach()[ok].abs().mean() if ok.any() else torch.tensor(0.0),
            "copg/ordered_frac": ordered.float().mean() if ordered.numel() else torch.tensor(0.0),
        }
        return spread_batch_loss(total, mask), metrics


register("objective", "copg", spec="arXiv:2406.19185 (CoPG, squared contrastive loss; reconstructed)",
         tags=("skip:T-ONPOL", "skip:T-ZEROADV", "skip:T-MICRO"))(CopgObjective)


# ---------------------------------------------------------------------------------------------------
# TRPA


def preference_levels(batch: Rollouts, threshold: float = 0.5, format_component: str = "format") -> Tensor:
    """[B] rule-based level, 1 best, from the rewards (our mapping): 1 = correct; 2 = wrong with the format ok;
    3 = unparsable (reward NaN: the verifier failed); 4 = wrong with a format error (needs reward component
    ``format_component``; absent -> every wrong row is 2)."""
    if batch.rewards is None:
        raise ValueError("trpa needs rollouts.rewards")
    r = batch.rewards.float()
    level = torch.where(torch.nan_to_num(r, nan=0.0) > threshold, 1, 2)
    fmt = batch.reward_components.get(format_component)
    if fmt is not None:
        level = torch.where((level == 2) & ~(torch.nan_to_num(fmt.float(), nan=0.0) > 0.5), 4, level)
    return torch.where(torch.isnan(r), 3, level)


def trpa_pair_losses(score_w: Tensor, score_l: Tensor, winner_level: Tensor, *, beta: float, anisotropy: float) -> Tensor:
    """-log sigmoid(beta * kappa * (l_w - l_l)), kappa = anisotropy when the winner is level 1."""
    kappa = torch.where(winner_level == 1, torch.full_like(score_w, anisotropy), torch.ones_like(score_w))
    return -F.logsigmoid(beta * kappa * (score_w - score_l))


class TrpaObjective(_SequenceLevel):
    """TRPA (Trust Region Preference Approximation; Su et al. 2025, arXiv:2504.04524).

    In words: rank each prompt's responses into rule-based preference levels, apply a DPO-style logistic loss to
    every pair of different levels (boosted by ``anisotropy`` when the winner is correct), plus a KL trust region
    to the rollout policy:
    l_i = mean_t logp - mean_t ref_logp; for each prompt, each pair of levels a < b and rows i (level a), j (level b):
    h = beta*kappa_a*(l_i - l_j), kappa_1 = ``anisotropy`` else 1; L_pref = mean over pairs of -log sigmoid(h).
    No pair in the micro-batch: L_pref = mean_i -log sigmoid(sgn_i * l_i), sgn = +1 at level 1 else -1.
    Trust region: L_TR = tr_kl_coef * masked_mean(k3(logp, old_logp)) (``sqrt_tr``: tr_kl_coef*sqrt(KL + 0.25)).
    L = L_pref + L_TR (a ref-KL regularizer is NOT added). Levels: :func:`preference_levels`.
    Per-token loss: L spread with weight 1/L_i (``aggregates``: seq-mean-token-sum); whole prompts per micro-batch
    (``needs_whole_groups``).
    Shared-test tags: T-ONPOL (not REINFORCE with batch.advantages), T-ZEROADV (the trust-region term acts on every
    token, also of an equal-level prompt, whenever logp != old_logp), T-MICRO (pairs couple rows).
    """

    name = "trpa"

    def __init__(self, *, beta: float = 0.1, anisotropy: float = 2.5, tr_kl_coef: float = 0.001, sqrt_tr: bool = False,
                 correct_threshold: float = 0.5, format_component: str = "format"):
        self.beta, self.anisotropy, self.tr_kl_coef, self.sqrt_tr = beta, anisotropy, tr_kl_coef, sqrt_tr
        self.correct_threshold, self.format_component = correct_threshold, format_component

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        if batch.ref_logp is None:
            raise ValueError("objective 'trpa' needs reference log-probs (rollouts.ref_logp)")
        device = out.logp.device
        score = seq_mean(out.logp, mask) - seq_mean(batch.ref_logp.to(device), mask)
        level = preference_levels(batch, self.correct_threshold, self.format_component).to(device)
        ok = usable_rows(batch).to(device)
        pairs = pairs_within_groups(batch.group.to(device), ok[:, None] & ok[None, :] & (level[:, None] < level[None, :]))
        if len(pairs):
            w, l = pairs[:, 0], pairs[:, 1]
            pref = trpa_pair_losses(score[w], score[l], level[w], beta=self.beta, anisotropy=self.anisotropy).mean()
        else:
            sign = torch.where(level == 1, 1.0, -1.0).to(score.dtype)
            pref = (-F.logsigmoid(sign * score) * ok).sum() / ok.sum().clamp(min=1)
        kl = masked_mean(kl_estimate(out.logp, old_logp_of(out, batch).to(device), "k3"), mask)
        trust = self.tr_kl_coef * (torch.sqrt(kl + 0.25) if self.sqrt_tr else kl)
        total = pref + trust + 0.0 * score.sum()
        s = score.detach()
        metrics = {
            "trpa/pref_loss": pref.detach(),
            "trpa/tr_kl_loss": trust.detach(),
            "trpa/pairs": torch.tensor(float(len(pairs))),
            "trpa/h_high": s[pairs[:, 0]].mean() if len(pairs) else torch.tensor(0.0),
            "trpa/h_low": s[pairs[:, 1]].mean() if len(pairs) else torch.tensor(0.0),
        }
        return spread_batch_loss(total, mask), metrics


register("objective", "trpa", spec="arXiv:2504.04524 (TRPA, level-pair preference loss + trust region)",
         tags=("skip:T-ONPOL", "skip:T-ZEROADV", "skip:T-MICRO"))(TrpaObjective)
