"""Vocabulary moments of the sampling policy that an estimator needs beyond the sampled token's log-prob.

``sum_pi_squared`` (sum_v pi(v | x, y_<t)^2 per completion position) feeds the Optimal Token Baseline's path
weight (policylab/algo/advantages/optimal_baselines.py). It is one no-grad teacher-forced pass of the policy with
the final hidden states, the output layer re-applied in chunks of rows so the [rows, T, V] logits stay small.
"""

from __future__ import annotations

import torch

from policylab.algo.advantages.optimal_baselines import SUM_PI_SQUARED, sum_squared_probs
from policylab.registry import register
from policylab.rollouts import Rollouts


@register("annotator", "sum_pi_squared", spec="arXiv:2602.07078 (OTB's sum_pi_squared; verl calculate_sum_pi_squared)")
class SumPiSquared:
    """sum_v pi(v | x, y_<t)^2 [B,T] of the current policy (before this batch's update, i.e. the sampling policy
    on-policy), at the training temperature; 0 on padding. Added automatically when a component requires it."""

    provides = (SUM_PI_SQUARED,)
    auto_provider = True

    def __init__(self, rows_per_chunk: int = 4):
        if rows_per_chunk < 1:
            raise ValueError(f"sum_pi_squared rows_per_chunk must be >= 1, got {rows_per_chunk}")
        self.rows_per_chunk = rows_per_chunk

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        policy = getattr(ctx, "policy", None)
        if policy is None:
            raise ValueError("sum_pi_squared needs ctx.policy (its output layer turns hidden states into logits)")
        hidden = ctx.score(rollouts, with_hidden=True).hidden
        head = policy.get_output_embeddings()
        weight, bias = head.weight.detach().float(), getattr(head, "bias", None)
        temperature = float(getattr(ctx, "temperature", 1.0)) or 1.0
        parts = []
        for start in range(0, hidden.shape[0], self.rows_per_chunk):
            logits = hidden[start:start + self.rows_per_chunk].float() @ weight.T
            if bias is not None:
                logits = logits + bias.detach().float()
            parts.append(sum_squared_probs(logits / temperature))
        return {SUM_PI_SQUARED: torch.cat(parts) * rollouts.completion_mask}
