"""KTO's reference point: the policy-to-reference KL estimated on mismatched (prompt, completion) pairs.

The registered objective ``kto`` is the loss of :class:`policylab.algo.objectives.preference.KtoLoss` plus this
batch pass, which scores each prompt paired with another prompt's completion under the policy and the frozen
reference (``ctx.score``), once per rollout batch, and counts the labelled rows of the whole batch.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from policylab.algo.objectives.preference import KtoLoss, mismatched_partners
from policylab.algo.objectives.sequence_level import seq_sum
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

log = logging.getLogger(__name__)

KTO_Z0 = declare_field("kto_z0", per_row=False, shape="scalar", dtype="float", owner="objective 'kto'",
                       doc="KTO reference point z0 = max(0, mean over mismatched (prompt, completion) pairs of "
                           "logp_seq - ref_logp_seq), no gradient")
KTO_ROW_SCALE = declare_field("kto_row_scale", per_row=False, shape="scalar", dtype="float", owner="objective 'kto'",
                              doc="usable rows / labelled rows of the whole rollout batch (KTO's per-example mean)")


@torch.no_grad()
def mismatched_reference_point(rollouts: Rollouts, ctx) -> Tensor:
    """z0 = max(0, mean_i [logp_seq - ref_logp_seq](prompt_i, completion_partner(i))) under ctx.policy and
    ctx.reference (TRL's KL estimate from shifted completions; partners from :func:`mismatched_partners`)."""
    partner = mismatched_partners(rollouts.group)
    rows = (partner >= 0).nonzero().flatten()
    if rows.numel() == 0:
        log.warning("kto: every row belongs to one prompt, no mismatched pair exists; reference point z0 = 0")
        return torch.tensor(0.0)
    if ctx.reference is None:
        raise ValueError("kto needs the reference model (ctx.reference) to estimate its reference point")
    other = partner[rows]
    shifted = rollouts.select(rows).with_(completion_ids=rollouts.completion_ids[other],
                                           completion_mask=rollouts.completion_mask[other])
    mask = shifted.completion_mask
    policy = seq_sum(ctx.score(shifted).logp, mask)
    ref = seq_sum(ctx.score(shifted, model=ctx.reference).logp, mask)
    return (policy - ref).mean().clamp(min=0).float()


class KtoObjective(KtoLoss):
    """KTO (Kahneman-Tversky Optimisation; Ethayarajh et al. 2024, arXiv:2402.01306), as CONSCIENTIA uses it on
    verifiable rewards.

    In words: each example's implicit reward r = logp_seq - ref_logp_seq is valued around a reference point z0
    through a sigmoid, desirable examples above it and undesirable ones below it:
    desirable lambda_D*(1 - sigmoid(beta*(r - z0))), undesirable lambda_U*(1 - sigmoid(beta*(z0 - r))),
    mean over labelled examples (the loss and its options: :class:`KtoLoss`).

    ``annotate`` (once per rollout batch, after the reference scorer and the offline pair transform): with
    ``reference_point="mismatched"`` z0 = max(0, mean KL estimate on mismatched prompt/completion pairs) under the
    policy and the reference model (field ``kto_z0``); always the batch's usable/labelled row ratio
    (``kto_row_scale``), so that any micro-batching is exact. The recipe's reference = the policy at the start of
    the run (CONSCIENTIA resets it each round; restart the run from the last checkpoint for a new round).
    Shared-test tags: T-ONPOL (not REINFORCE with batch.advantages), T-ZEROADV (unpaired: an all-desirable prompt
    still trains, by design), T-MICRO (a bare call without the batch pass takes its reference point and its
    labelled fraction from the micro-batch it sees).
    """

    provides = (KTO_Z0, KTO_ROW_SCALE)  # per instance: kto_row_scale only unless reference_point is "mismatched"

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference_point: str = "mismatched", correct_threshold: float = 0.5):
        super().__init__(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                         reference_point=reference_point, correct_threshold=correct_threshold)
        self.provides = (KTO_Z0, KTO_ROW_SCALE) if reference_point == "mismatched" else (KTO_ROW_SCALE,)
        self.needs_reference_model = reference_point == "mismatched"

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        out = {"kto_row_scale": self.row_scale(rollouts).float()}
        if self.reference_point == "mismatched":
            out["kto_z0"] = mismatched_reference_point(rollouts, ctx)
        return out


register("objective", "kto", spec="arXiv:2402.01306 (KTO loss; reference point from mismatched pairs, TRL)",
         tags=("skip:T-ONPOL", "skip:T-ZEROADV", "skip:T-MICRO"))(KtoObjective)
