"""Prompt log-likelihood scoring for ProGRPO / ARM: c(q) = mean log pi(q_t | q_<t) of each prompt.

The advantage ``progrpo`` lives here because its ``annotate`` pass runs the policy over the prompts
(``ctx.score`` on a Rollouts whose completions are the prompt tokens); the shift itself is
:func:`policylab.algo.advantages.confidence.progrpo_shift`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.confidence import low_probability_confidence, progrpo_shift
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.advantages.reductions import first_row_of_each_group, masked_row_mean, rewards_of, sequence_logp
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

PROMPT_CONFIDENCE = declare_field("progrpo_prompt_confidence", per_row=True, shape="[B]", dtype="float",
                                  owner="advantage 'progrpo'",
                                  doc="c(q): mean log-prob of prompt tokens 2..|q| under the policy (= -log PPL(q))")


def prompt_as_completion(rollouts: Rollouts, rows: Tensor) -> Rollouts:
    """Rollouts whose 'completion' is prompt tokens 2..|q| of the given rows (first prompt token as context),
    so ``ctx.score`` yields log pi(q_t | q_<t) for t >= 2."""
    tokens = [rollouts.prompt_ids[i][rollouts.prompt_mask[i] > 0] for i in rows.tolist()]
    width = max([t.numel() - 1 for t in tokens] + [1])
    k = len(tokens)
    first = torch.zeros(k, 1, dtype=torch.long)
    rest = torch.zeros(k, width, dtype=torch.long)
    mask = torch.zeros(k, width)
    for j, t in enumerate(tokens):
        if t.numel():
            first[j, 0] = t[0]
        rest[j, : max(t.numel() - 1, 0)] = t[1:]
        mask[j, : max(t.numel() - 1, 0)] = 1.0
    return Rollouts(prompt_ids=first, prompt_mask=torch.ones(k, 1), completion_ids=rest, completion_mask=mask,
                    group=torch.arange(k), truncated=torch.zeros(k, dtype=torch.bool))


@register("advantage", "progrpo", spec="arXiv:2602.05281 (ARM / ProGRPO, reconstructed)", tags=("skip:A-SHIFT",))
class ProGRPOAdvantage:
    """ProGRPO / ARM (arXiv:2602.05281, reconstructed): the GRPO advantage plus alpha·(c(q) - c(o|q)) for
    correct responses in groups that have one, attenuating over-confident correct paths.

    c(q) = mean log pi(q_t|q_<t) over prompt tokens 2..|q| (= -log PPL(q)), computed once per prompt by
    ``annotate`` with ``ctx.score`` (provides ``progrpo_prompt_confidence``); c(o|q) = mean of the
    ceil(low_fraction·L) lowest token log-probs of the response under the sampling policy (``old_logp``, else
    ``behavior_logp``). Our choices (the paper's definitions were not recovered): these c(.) definitions,
    alpha = 0.1, low_fraction = 0.2, apply_to = "correct", no shift clip, correct = reward > 0.5 (an absolute
    threshold, so a reward offset is not neutral: tagged skip:A-SHIFT).
    """

    requires = ("rewards", "behavior_logp", PROMPT_CONFIDENCE.name)  # c(q) comes from its own annotate pass
    provides = (PROMPT_CONFIDENCE,)

    def __init__(self, alpha: float = 0.1, low_fraction: float = 0.2, apply_to: str = "correct",
                 shift_clip: float | None = None, correct_threshold: float = 0.5, eps: float = 1e-6):
        if not 0 < low_fraction <= 1:
            raise ValueError(f"progrpo low_fraction must be in (0, 1], got {low_fraction}")
        if apply_to not in ("correct", "all"):
            raise ValueError(f"progrpo apply_to must be 'correct' or 'all', got {apply_to!r}")
        self.alpha, self.low_fraction, self.apply_to = alpha, low_fraction, apply_to
        self.shift_clip, self.correct_threshold, self.eps = shift_clip, correct_threshold, eps
        self.last_metrics: dict[str, float] = {}

    def annotate(self, rollouts: Rollouts, ctx) -> dict[str, Tensor]:
        idx, first = first_row_of_each_group(rollouts.group)
        prompts = prompt_as_completion(rollouts, first)
        if prompts.completion_mask.sum() > 0:
            per_prompt = masked_row_mean(ctx.score(prompts).logp.detach().float().cpu(), prompts.completion_mask)
        else:  # every prompt is one token long: c(q) = 0
            per_prompt = torch.zeros(first.numel())
        return {PROMPT_CONFIDENCE.name: per_prompt[idx]}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "progrpo")
        if PROMPT_CONFIDENCE.name not in rollouts.extras:
            raise ValueError("progrpo needs rollouts.extras['progrpo_prompt_confidence'], which its annotate pass provides")
        prompt_conf = rollouts.extras[PROMPT_CONFIDENCE.name].float()
        mask = rollouts.completion_mask
        answer_conf = low_probability_confidence(sequence_logp(rollouts), mask, self.low_fraction)
        adv = grpo_advantage(rollouts, eps=self.eps)
        out = progrpo_shift(adv, r, rollouts.group, prompt_conf, answer_conf, rollouts.lengths, alpha=self.alpha,
                            apply_to=self.apply_to, shift_clip=self.shift_clip, correct_threshold=self.correct_threshold)
        shifted = out != adv
        self.last_metrics = {"progrpo/prompt_confidence": float(prompt_conf.mean()) if prompt_conf.numel() else 0.0,
                             "progrpo/mean_shift": float((out - adv)[shifted].mean()) if shifted.any() else 0.0}
        return out
