"""CalibRL expert-calibrated guide loss (advantages_rewards.md B21), a regularizer with a prepare pass.

The advantage part of CalibRL is ``dr_grpo`` over the on-policy rollouts (the expert trajectory never
enters the batch, so it is excluded from the statistics and from the PG loss by construction); this
module adds the LeakyReLU guide term that uses the expert's log-probs as a per-position baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import encode, pad_id_of, pad_left, pad_right, prompt_tokens, score_in_chunks
from policylab.algo.group_stats import group_index
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def calibrl_guide_loss(logp: Tensor, expert_logp: Tensor, passed: Tensor, abs_adv: Tensor, *, slope: float = 0.5) -> Tensor:
    """ℓ_guide[i,t] = LeakyReLU(−(2·pass_i − 1)(log π_θ(o_{i,t}) − e_t), slope)·|A_i| (B21).

    Passing rollouts are pulled above the expert's log-prob at the same position, failing ones pushed
    below it; the weight |A_i| is the group rareness of the rollout's outcome.
    """
    sign = (2 * passed.float() - 1)[:, None]
    g = -sign * (logp - expert_logp)
    return torch.nn.functional.leaky_relu(g, negative_slope=slope) * abs_adv


@register("regularizer", "calibrl_guide", spec="advantages_rewards.md B21")
class CalibRLGuide:
    """CalibRL guide term: coef·LeakyReLU(−(2·pass − 1)(log π_θ − e_t), 0.5)·|A_i| on on-policy tokens.

    ``prepare`` reads each prompt's expert trajectory from the row field ``solution_field`` and stores its
    log-probs under the current policy (= π_old), position-aligned with the rollouts; positions at or
    past the expert's length are masked (the released code reads padding there — a required deviation).
    Prompts without an expert get no guide term. pass_i = reward > ``pass_threshold``.
    """

    def __init__(self, coef: float = 0.1, slope: float = 0.5, pass_threshold: float = 0.1, solution_field: str = "solution",
                 batch_size: int = 16):
        self.coef, self.slope, self.pass_threshold, self.solution_field, self.batch_size = coef, slope, pass_threshold, solution_field, batch_size

    @torch.no_grad()
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if ctx is None or getattr(ctx, "model", None) is None or getattr(ctx, "tokenizer", None) is None:
            raise ValueError("calibrl_guide needs ctx.model and ctx.tokenizer in prepare() to score expert trajectories")
        tok = ctx.tokenizer
        b, width = rollouts.completion_ids.shape
        idx, k = group_index(rollouts.group)
        owners, prompts, experts = [], [], []
        for g in range(k):
            first = int((idx == g).nonzero()[0])
            row = rollouts.rows[first] if rollouts.rows else {}
            solution = row.get(self.solution_field)
            if solution is None or str(solution) == "":
                continue
            ids = encode(tok, str(solution))
            eos = getattr(tok, "eos_token_id", None)
            owners.append(g)
            prompts.append(prompt_tokens(rollouts, first))
            experts.append(ids + ([int(eos)] if eos is not None else []))
        expert_logp = torch.zeros(b, width)
        expert_mask = torch.zeros(b, width)
        if owners:
            for g, logp in zip(owners, self._score(ctx, prompts, experts, pad_id_of(tok))):
                n = min(width, logp.numel())
                rows = (idx == g).nonzero().flatten()
                expert_logp[rows, :n] = logp[:n]
                expert_mask[rows, :n] = 1.0
        return rollouts.with_(extras=dict(rollouts.extras, calibrl_expert_logp=expert_logp, calibrl_expert_mask=expert_mask))

    def _score(self, ctx, prompts, experts, pad) -> list[Tensor]:
        """Expert log-probs with the loop's scorer (same temperature as the policy's logp) when it has one."""
        if getattr(ctx, "score", None) is None:
            return [s["logp"] for s in score_in_chunks(ctx.model, prompts, experts, pad, chunk=self.batch_size)]
        p_ids, p_mask = pad_left(prompts, pad)
        c_ids, c_mask = pad_right(experts, pad)
        batch = Rollouts(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                         group=torch.arange(len(experts)), truncated=torch.zeros(len(experts), dtype=torch.bool))
        logp = ctx.score(batch).logp.float().cpu()
        return [logp[j, : len(e)] for j, e in enumerate(experts)]

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if "calibrl_expert_logp" not in batch.extras:
            raise ValueError("calibrl_guide: batch.extras has no expert log-probs; the loop must call prepare(rollouts, ctx) first")
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
