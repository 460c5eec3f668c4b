"""Advantages of the classification/sparse family: PSR / NSR / W-REINFORCE (objectives.md §3.4) and
ReasonMaxxer's per-problem standardisation (§4.3).

PSR / NSR / W-REINFORCE use no baseline and no normalisation: A = +lambda on correct samples, -1 on incorrect
ones (correct iff reward > ``correct_threshold``; NaN = failed sample -> 0). PSR and NSR train ONLY on their
subset: their ``prepare`` hook keeps just those rows, so the aggregation normaliser counts only them, as the
spec's code does (batch subset in ray_trainer). The objective is the baseline ``reinforce`` / ``ppo_clip``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.group_stats import group_mean_std
from policylab.registry import register
from policylab.rollouts import Rollouts


def _correct(rollouts: Rollouts, threshold: float) -> tuple[Tensor, Tensor]:
    if rollouts.rewards is None:
        raise ValueError("this advantage needs rollouts.rewards; run the reward stage first")
    r = rollouts.rewards.float()
    valid = ~torch.isnan(r)
    return (torch.nan_to_num(r, nan=0.0) > threshold) & valid, valid


def signed_reinforce_advantage(rollouts: Rollouts, *, positive_weight: float, negative_weight: float,
                               correct_threshold: float = 0.5) -> Tensor:
    """A_i = +positive_weight if correct, -negative_weight if incorrect, 0 if the reward failed (§3.4)."""
    correct, valid = _correct(rollouts, correct_threshold)
    adv = torch.where(correct, positive_weight, -negative_weight).float()
    return torch.where(valid, adv, torch.zeros_like(adv))


@register("advantage", "w_reinforce", spec="objectives.md §3.4 (W-REINFORCE)")
@torch.no_grad()
def w_reinforce_advantage(rollouts: Rollouts, *, positive_weight: float = 0.1, correct_threshold: float = 0.5) -> Tensor:
    """W-REINFORCE: A = +lambda (``positive_weight``, paper 0.1) on correct, -1 on incorrect, all samples kept.
    lambda = 1 is REINFORCE with rewards {+1,-1}; lambda = 0 is NSR without the subset (same gradient,
    different normaliser)."""
    return signed_reinforce_advantage(rollouts, positive_weight=positive_weight, negative_weight=1.0,
                                      correct_threshold=correct_threshold)


class _SubsetReinforce:
    keep_correct: bool

    def __init__(self, correct_threshold: float = 0.5):
        self.correct_threshold = correct_threshold

    def prepare(self, rollouts: Rollouts, ctx=None) -> Rollouts:
        """Keep only this method's samples. With none left, keep the rows but mask every token (nothing to learn)."""
        correct, valid = _correct(rollouts, self.correct_threshold)
        keep = valid & (correct if self.keep_correct else ~correct)
        if keep.any():
            return rollouts.select(keep)
        rollouts.completion_mask = torch.zeros_like(rollouts.completion_mask)
        return rollouts

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        weights = (1.0, 0.0) if self.keep_correct else (0.0, 1.0)
        return signed_reinforce_advantage(rollouts, positive_weight=weights[0], negative_weight=weights[1],
                                          correct_threshold=self.correct_threshold)


class PsrAdvantage(_SubsetReinforce):
    """PSR (positive sample reinforcement), §3.4: A = +1 on correct samples; incorrect ones are removed from the
    batch in ``prepare``."""

    keep_correct = True


class NsrAdvantage(_SubsetReinforce):
    """NSR (negative sample reinforcement), §3.4: A = -1 on incorrect samples; correct ones are removed from the
    batch in ``prepare``."""

    keep_correct = False


register("advantage", "psr", spec="objectives.md §3.4 (PSR)")(PsrAdvantage)
register("advantage", "nsr", spec="objectives.md §3.4 (NSR)")(NsrAdvantage)


@register("advantage", "reasonmaxxer", spec="objectives.md §4.3 (per-problem standardised advantage)")
@torch.no_grad()
def reasonmaxxer_advantage(rollouts: Rollouts, *, adv_clip: float = 2.5, eps: float = 1e-8) -> Tensor:
    """A = clip((R - mean_q R) / (pstd_q R + eps), -adv_clip, adv_clip), population std per problem (§4.3).

    A problem whose rollouts all score the same (or a single rollout) gets A = 0; NaN rewards get 0.
    """
    if rollouts.rewards is None:
        raise ValueError("reasonmaxxer advantage needs rollouts.rewards")
    r = rollouts.rewards.float()
    mean, std, count = group_mean_std(r, rollouts.group, unbiased=False)
    adv = torch.where(count > 1, (r - mean) / (std + eps), torch.zeros_like(r))
    return torch.nan_to_num(adv, nan=0.0).clamp(-adv_clip, adv_clip)
