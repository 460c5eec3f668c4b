"""Advantages that read the policy's own confidence: ProGRPO/ARM's confidence-gap shift and CAPO's
calibration (logistic pairwise AUC) advantage.

Both use sequence log-probs of the policy that produced the batch (``old_logp``, else the engine's
``behavior_logp``). ProGRPO also needs the prompt's log-likelihood, a scoring pass: its registered class is in
:mod:`policylab.annotate.prompt_confidence` and calls :func:`progrpo_shift` here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import masked_row_mean, rewards_of, sequence_logp
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts

# --------------------------------------------------------------------------------------------------
# ProGRPO / ARM (arXiv:2602.05281)


def low_probability_confidence(token_logp: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """c(o|q) of B6 [B]: mean of the k = ceil(fraction·L_i) smallest valid token log-probs; L_i = 0 gives 0."""
    out = torch.zeros(token_logp.shape[0])
    for i in range(token_logp.shape[0]):
        values = token_logp[i][mask[i] > 0]
        if values.numel():
            k = max(1, math.ceil(fraction * values.numel()))
            out[i] = values.sort().values[:k].mean()
    return out


def progrpo_shift(adv: Tensor, rewards: Tensor, group: Tensor, prompt_conf: Tensor, answer_conf: Tensor, lengths: Tensor,
                  *, alpha: float, apply_to: str = "correct", shift_clip: float | None = None,
                  correct_threshold: float = 0.5) -> Tensor:
    """B6: Ã_i = A_i + alpha·(c(q) - c(o_i|q)) in groups with a correct response, else A_i.

    ``apply_to``: "correct" (default) shifts correct responses only, "all" every response of such groups;
    ``shift_clip`` bounds the shift to [-delta, delta]; empty responses get no shift.
    """
    if apply_to not in ("correct", "all"):
        raise ValueError(f"progrpo apply_to must be 'correct' or 'all', got {apply_to!r}")
    idx, k = group_index(group)
    correct = ~torch.isnan(rewards) & (rewards > correct_threshold)
    group_has_correct = torch.zeros(k, dtype=torch.bool).index_put_((idx,), correct, accumulate=True)[idx]
    shift = alpha * (prompt_conf - answer_conf)
    if shift_clip is not None:
        shift = shift.clamp(-shift_clip, shift_clip)
    target = correct if apply_to == "correct" else ~torch.isnan(rewards)
    apply = group_has_correct & target & (lengths > 0)
    return torch.where(apply, adv + shift, adv)


# --------------------------------------------------------------------------------------------------
# CAPO calibration (arXiv:2604.12632)


def capo_pairwise_advantages(confidence: Tensor, correct: Tensor, usable: Tensor, group: Tensor, tau: float) -> Tensor:
    """B10: negative gradient of the logistic AUC surrogate, scaled so equal confidences give +-1.

    Per group, correct i: A_i = (2/|W|) sum_{j in W} sigmoid((s_j - s_i)/tau); incorrect j:
    A_j = -(2/|C|) sum_{i in C} sigmoid((s_j - s_i)/tau). A group without both classes gets 0.
    Only ``usable`` rows (reward present, at least one token) take part.
    """
    adv = torch.zeros(confidence.shape[0])
    idx, k = group_index(group)
    for g in range(k):
        rows = (idx == g) & usable
        pos, neg = (rows & correct).nonzero().flatten(), (rows & ~correct).nonzero().flatten()
        if pos.numel() == 0 or neg.numel() == 0:
            continue
        pair = torch.sigmoid((confidence[neg][None, :] - confidence[pos][:, None]) / tau)  # [|C|, |W|]
        adv[pos] = 2 * pair.sum(1) / neg.numel()
        adv[neg] = -2 * pair.sum(0) / pos.numel()
    return adv


def capo_noise_mask(ref_confidence: Tensor, correct: Tensor, usable: Tensor, group: Tensor, q: float) -> Tensor:
    """[B] True where B10's noise rule zeroes the advantage: a correct answer the reference finds unlikely
    (s_ref below the group's q-quantile, a "lucky guess") or an incorrect one it finds likely (above 1-q)."""
    noisy = torch.zeros(ref_confidence.shape[0], dtype=torch.bool)
    idx, k = group_index(group)
    for g in range(k):
        rows = ((idx == g) & usable).nonzero().flatten()
        if rows.numel() < 2:
            continue
        s = ref_confidence[rows].double()
        low, high = torch.quantile(s, q), torch.quantile(s, 1 - q)
        noisy[rows] = (correct[rows] & (s < low)) | (~correct[rows] & (s > high))
    return noisy


def confidence_auc(confidence: Tensor, correct: Tensor) -> float:
    """ROC-AUC of confidence for separating correct from incorrect (ties count 1/2); 0.5 without both classes."""
    pos, neg = confidence[correct], confidence[~correct]
    if pos.numel() == 0 or neg.numel() == 0:
        return 0.5
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@register("advantage", "capo_calibration", spec="arXiv:2604.12632 (logistic AUC surrogate, noise masking)",
          tags=("skip:A-SHIFT",))
class CAPOCalibrationAdvantage:
    """CAPO calibration (arXiv:2604.12632, reconstructed): the negative gradient of a logistic pairwise AUC
    surrogate on the confidence s = mean log pi_old of each response: correct i gets (2/|W|) sum_j
    sigmoid((s_j - s_i)/tau) over the group's incorrect j, incorrect j the mirrored negative sum.

    Correct = reward > ``correct_threshold`` (0.5): binary correctness, so a reward offset is not neutral
    (tagged skip:A-SHIFT). With ``mask_noise`` it requires ``ref_logp`` (the reference
    scorer is added to the run) and s_ref = mean log pi_ref flags noisy samples by the group quantile
    ``noise_quantile``; their advantage is set to 0 after the pairwise sums (the spec's rule; its E3 row instead
    drops their pairs). Our choices: tau = 1, q = 0.1, the ±1 scaling, the masking rule.
    """

    def __init__(self, tau: float = 1.0, noise_quantile: float = 0.1, mask_noise: bool = True, correct_threshold: float = 0.5):
        if tau <= 0:
            raise ValueError(f"capo_calibration tau must be > 0, got {tau}")
        if not 0 <= noise_quantile < 0.5:
            raise ValueError(f"capo_calibration noise_quantile must be in [0, 0.5), got {noise_quantile}")
        self.tau, self.noise_quantile, self.mask_noise = tau, noise_quantile, mask_noise
        self.correct_threshold = correct_threshold
        self.last_metrics: dict[str, float] = {}

    def requires(self) -> tuple[str, ...]:
        return ("rewards", "behavior_logp") + (("ref_logp",) if self.mask_noise else ())

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "capo_calibration")
        mask = rollouts.completion_mask.float()
        confidence = masked_row_mean(sequence_logp(rollouts), mask)
        correct = nan_to_zero(r) > self.correct_threshold
        usable = ~torch.isnan(r) & (mask.sum(-1) > 0)
        adv = capo_pairwise_advantages(confidence, correct, usable, rollouts.group, self.tau)
        noisy = torch.zeros_like(usable)
        if self.mask_noise:
            if rollouts.ref_logp is None:
                raise ValueError("capo_calibration with mask_noise needs rollouts.ref_logp (reference model log-probs)")
            ref_confidence = masked_row_mean(rollouts.ref_logp.float(), mask)
            noisy = capo_noise_mask(ref_confidence, correct, usable, rollouts.group, self.noise_quantile)
            adv = torch.where(noisy, torch.zeros_like(adv), adv)
        self.last_metrics = {"capo/auc": confidence_auc(confidence[usable], correct[usable]),
                             "capo/frac_masked": float(noisy.float().mean()) if noisy.numel() else 0.0}
        return adv
