"""Signed advantages on sample subsets: PSR / NSR / W-REINFORCE (arXiv:2506.01347) and ReasonMaxxer's clipped
per-problem standardisation (arXiv:2605.06241).

PSR / NSR / W-REINFORCE use no baseline and no normalisation: A = +lambda on correct samples, -1 on incorrect
ones (correct iff reward > ``correct_threshold``; NaN = failed sample -> 0); the threshold is absolute, so a
reward offset is not neutral (tagged skip:A-SHIFT). PSR and NSR train ONLY on their
subset: their ``transform`` keeps just those rows, so the aggregation normaliser counts only them, as the
paper's code does (batch subset in ray_trainer). The objective is the baseline ``reinforce`` / ``ppo_clip``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.reductions import rewards_of
from policylab.algo.group_stats import group_mean_std
from policylab.registry import register
from policylab.rollouts import Rollouts


def _correct(rollouts: Rollouts, threshold: float) -> tuple[Tensor, Tensor]:
    r = rewards_of(rollouts, "this advantage")
    valid = ~torch.isnan(r)
    return (torch.nan_to_num(r, nan=0.0) > threshold) & valid, valid


def signed_reinforce_advantage(rollouts: Rollouts, *, positive_weight: float, negative_weight: float,
                               correct_threshold: float = 0.5) -> Tensor:
    """A_i = +positive_weight if correct, -negative_weight if incorrect, 0 if the reward failed."""
    correct, valid = _correct(rollouts, correct_threshold)
    adv = torch.where(correct, positive_weight, -negative_weight).float()
    return torch.where(valid, adv, torch.zeros_like(adv))


@register("advantage", "w_reinforce", spec="arXiv:2506.01347 (W-REINFORCE)", requires=("rewards",),
          tags=("skip:A-SHIFT",))
@torch.no_grad()
def w_reinforce_advantage(rollouts: Rollouts, *, positive_weight: float = 0.1, correct_threshold: float = 0.5) -> Tensor:
    """W-REINFORCE (arXiv:2506.01347): A = +lambda (``positive_weight``, paper 0.1) on correct, -1 on incorrect,
    all samples kept.
    lambda = 1 is REINFORCE with rewards {+1,-1}; lambda = 0 is NSR without the subset (same gradient,
    different normaliser)."""
    return signed_reinforce_advantage(rollouts, positive_weight=positive_weight, negative_weight=1.0,
                                      correct_threshold=correct_threshold)


class _SubsetReinforce:
    """A batch transform (drops the other subset's rows) plus the signed advantage on the rows it keeps."""

    keep_correct: bool
    requires = ("rewards",)
    provides = ()

    def __init__(self, correct_threshold: float = 0.5):
        self.correct_threshold = correct_threshold

    def transform(self, rollouts: Rollouts, ctx=None) -> Rollouts:
        """Keep only this method's samples. With none left, keep the rows but mask every token (nothing to learn)."""
        correct, valid = _correct(rollouts, self.correct_threshold)
        keep = valid & (correct if self.keep_correct else ~correct)
        if keep.any():
            return rollouts.select(keep)
        return rollouts.with_(completion_mask=torch.zeros_like(rollouts.completion_mask))

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        weights = (1.0, 0.0) if self.keep_correct else (0.0, 1.0)
        return signed_reinforce_advantage(rollouts, positive_weight=weights[0], negative_weight=weights[1],
                                          correct_threshold=self.correct_threshold)


class PsrAdvantage(_SubsetReinforce):
    """PSR, positive sample reinforcement (arXiv:2506.01347): A = +1 on correct samples; incorrect ones are
    removed from the batch by ``transform``."""

    keep_correct = True


class NsrAdvantage(_SubsetReinforce):
    """NSR, negative sample reinforcement (arXiv:2506.01347): A = -1 on incorrect samples; correct ones are
    removed from the batch by ``transform``."""

    keep_correct = False


register("advantage", "psr", spec="arXiv:2506.01347 (PSR)", tags=("skip:A-SHIFT",))(PsrAdvantage)
register("advantage", "nsr", spec="arXiv:2506.01347 (NSR)", tags=("skip:A-SHIFT",))(NsrAdvantage)


@register("advantage", "reasonmaxxer", spec="arXiv:2605.06241 (per-problem standardised advantage)", requires=("rewards",))
@torch.no_grad()
def reasonmaxxer_advantage(rollouts: Rollouts, *, adv_clip: float = 2.5, eps: float = 1e-8) -> Tensor:
    """ReasonMaxxer (arXiv:2605.06241): the reward standardised per problem with the population std and clipped,
    A = clip((R - mean_q R) / (pstd_q R + eps), -adv_clip, adv_clip).

    A problem whose rollouts all score the same (or a single rollout) gets A = 0; NaN rewards get 0.
    """
    r = rewards_of(rollouts, "reasonmaxxer advantage")
    mean, std, count = group_mean_std(r, rollouts.group, unbiased=False)
    adv = torch.where(count > 1, (r - mean) / (std + eps), torch.zeros_like(r))
    return torch.nan_to_num(adv, nan=0.0).clamp(-adv_clip, adv_clip)
