"""CalibRL (arXiv:2602.20197): the expert trajectory scored under the current policy, for the guide term.

The advantage part of CalibRL is ``dr_grpo`` over the on-policy rollouts (the expert trajectory never
enters the batch, so it is excluded from the statistics and from the PG loss by construction). This
regularizer's ``annotate`` scores each prompt's expert trajectory with ``ctx.score`` (same temperature
as the policy's log-probs); the loss is policylab/algo/regularizers/expert_guide.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.group_stats import group_index
from policylab.algo.regularizers.expert_guide import calibrl_guide_loss
from policylab.annotate.token_batches import encode, pad_id_of, prompt_tokens, score_pairs
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

declare_field("calibrl_expert_logp", per_row=True, shape="[B,T]", dtype="float", owner="regularizer 'calibrl_guide'",
              doc="log-prob under the current policy of the prompt's expert trajectory at each completion position")
declare_field("calibrl_expert_mask", per_row=True, shape="[B,T]", dtype="float", owner="regularizer 'calibrl_guide'",
              doc="1 where the expert trajectory has a token at that position, 0 past its length or without an expert")


@register("regularizer", "calibrl_guide", spec="arXiv:2602.20197 (compute_mix_policy_loss 'expert-guided')")
class CalibRLGuide:
    """CalibRL guide term (arXiv:2602.20197): coef·LeakyReLU(−(2·pass_i − 1)(log π_θ(o_{i,t}) − e_t), slope)·|A_i|
    on on-policy tokens, e_t the expert trajectory's log-prob at the same position.

    ``annotate`` reads each prompt's expert trajectory from the row field ``solution_field`` (+ EOS) and
    stores its log-probs under the current policy (= π_old), position-aligned with the rollouts; positions
    at or past the expert's length are masked (the released code reads padding there — a required
    deviation). Prompts without an expert get no guide term. pass_i = reward > ``pass_threshold`` (the
    paper's rule, not :func:`policylab.algo.group_stats.correctness`). It also reads the batch's advantages,
    which the advantage stage always provides before the update.
    """

    provides = ("calibrl_expert_logp", "calibrl_expert_mask")
    requires = ("rewards", "rows", "calibrl_expert_logp", "calibrl_expert_mask")

    def __init__(self, coef: float = 0.1, slope: float = 0.5, pass_threshold: float = 0.1, solution_field: str = "solution"):
        self.coef, self.slope, self.pass_threshold, self.solution_field = coef, slope, pass_threshold, solution_field

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        if ctx is None or getattr(ctx, "tokenizer", None) is None:
            raise ValueError("calibrl_guide needs ctx.tokenizer (and ctx.score) in annotate() to score expert trajectories")
        tok = ctx.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        b, width = rollouts.completion_ids.shape
        idx, k = group_index(rollouts.group)
        owners, prompts, experts = [], [], []
        for g in range(k):
            first = int((idx == g).nonzero()[0])
            row = rollouts.rows[first] if rollouts.rows else {}
            solution = row.get(self.solution_field)
            if solution is None or str(solution) == "":
                continue
            owners.append(g)
            prompts.append(prompt_tokens(rollouts, first))
            experts.append(encode(tok, str(solution)) + ([int(eos)] if eos is not None else []))
        expert_logp = torch.zeros(b, width)
        expert_mask = torch.zeros(b, width)
        for g, scored in zip(owners, score_pairs(ctx, prompts, experts, pad_id_of(tok))):
            n = min(width, scored["logp"].numel())
            rows = (idx == g).nonzero().flatten()
            expert_logp[rows, :n] = scored["logp"][:n]
            expert_mask[rows, :n] = 1.0
        return {"calibrl_expert_logp": expert_logp, "calibrl_expert_mask": expert_mask}

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if "calibrl_expert_logp" not in batch.extras:
            raise ValueError("calibrl_guide: batch.extras has no expert log-probs; its annotate(rollouts, ctx) must run first")
        if batch.rewards is None or batch.advantages is None:
            raise ValueError("calibrl_guide needs rewards and advantages on the batch")
        device = out.logp.device
        e = batch.extras["calibrl_expert_logp"].to(device)
        e_mask = batch.extras["calibrl_expert_mask"].to(device)
        passed = torch.nan_to_num(batch.rewards.float(), nan=-float("inf")).to(device) > self.pass_threshold
        adv = batch.advantages.to(device)
        abs_adv = adv.abs()[:, None] if adv.dim() == 1 else adv.abs()
        guide = calibrl_guide_loss(out.logp, e, passed, abs_adv, slope=self.slope) * e_mask
        mask = batch.completion_mask.to(device) * e_mask
        value = (guide.detach() * mask).sum() / mask.sum().clamp(min=1)
        return self.coef * guide, {"calibrl/guided_loss": value, "calibrl/expert_token_frac":
                                   mask.sum() / batch.completion_mask.sum().clamp(min=1)}
