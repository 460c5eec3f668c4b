"""CAPO credit (arXiv:2508.02298): judged step flags become token-level process penalties.

``annotate`` asks a step judge (policylab/rewards/judges/steps.py, or the policy itself through
``ctx.generate``) for K critiques per rollout, votes them per step and maps the step flags onto the
completion tokens; ``__call__`` is the token-reward arithmetic of policylab/algo/advantages/probe_credit.py.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from policylab.algo.advantages.probe_credit import VOTING, capo_token_rewards, token_group_normalise, token_step_index, vote
from policylab.algo.advantages.reductions import rewards_of
from policylab.algo.group_stats import correctness, zero_failed
from policylab.annotate.token_batches import completion_tokens, token_texts
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rewards.judges.steps import Verdicts, critique_prompt, parse_critique, resolve_judge, split_steps
from policylab.rollouts import Rollouts

declare_field("capo_step_flags", per_row=True, shape="[B,T]", dtype="float", owner="advantage 'capo_credit'",
              doc="voted flaw flag f of the reasoning step that holds each completion token (0 = clean)")
declare_field("capo_flagged_steps", per_row=True, shape="[B]", dtype="float", owner="advantage 'capo_credit'",
              doc="number of steps of the rollout with a non-zero vote")


class PolicyCritic:
    """The policy as a one-pass generative PRM: critiques sampled through the run's engine (``ctx.generate``,
    one request per rollout, ``k`` completions each), parsed by :func:`parse_critique`."""

    def __init__(self, ctx, *, delimiter: str = "\n\n", temperature: float = 0.7, max_new_tokens: int = 64):
        if ctx is None or getattr(ctx, "generate", None) is None:
            raise ValueError("capo_credit judge 'policy' needs ctx.generate in annotate() to sample critiques")
        self.ctx, self.delimiter, self.temperature, self.max_new_tokens = ctx, delimiter, temperature, max_new_tokens

    def critiques(self, prompts: Sequence[str], completions: Sequence[str], k: int) -> list[list[Verdicts]]:
        """``k`` parsed critiques of each (prompt, completion)."""
        requests = [{"prompt": critique_prompt(p, c, self.delimiter)} for p, c in zip(prompts, completions)]
        if not requests:
            return []
        out = self.ctx.generate(requests, group_size=k, temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        texts = list(out.completions)
        return [[parse_critique(texts[i * k + j], len(split_steps(c, self.delimiter))) for j in range(k)]
                for i, c in enumerate(completions)]


@register("advantage", "capo_credit", spec="arXiv:2508.02298 (reconstructed from the abstract)")
class CAPOCreditAdvantage:
    """CAPO credit (arXiv:2508.02298): K critiques list a rollout's flawed steps; their per-step vote f gives
    token rewards R[i,t] = W_whole·r_i − W_proc·f(step of t), normalised over all valid tokens of the group.

    ``judge``: a step judge (rewards/judges/steps.py): "arithmetic" (rule-checks "a + b = c" claims; the
    testbed's), "policy" (the policy critiques itself through the run's engine, temperature
    ``critique_temperature``), "none", "module:attr", a mapping of LLM-judge options, or a callable.
    Steps are ``completion.split(delimiter)``. Reconstructed from the abstract: W_whole = 2, W_proc = 1,
    K = 4, majority voting are our defaults (W_whole > W_proc keeps every correct answer above every wrong one).
    """

    provides = ("capo_step_flags", "capo_flagged_steps")
    requires = ("rewards", "capo_step_flags", "capo_flagged_steps")

    def __init__(self, judge: str | dict | Callable = "arithmetic", num_critiques: int = 4, voting: str = "majority",
                 w_whole: float = 2.0, w_proc: float = 1.0, eps: float = 1e-6, delimiter: str = "\n\n",
                 critique_temperature: float = 0.7, critique_max_tokens: int = 64):
        if voting not in VOTING:
            raise ValueError(f"capo voting must be one of {VOTING}, got {voting!r}")
        if num_critiques < 1:
            raise ValueError(f"capo num_critiques must be >= 1, got {num_critiques}")
        self.judge_spec, self.judge = judge, resolve_judge(judge, delimiter=delimiter)
        self.num_critiques, self.voting, self.w_whole, self.w_proc, self.eps = num_critiques, voting, w_whole, w_proc, eps
        self.delimiter, self.critique_temperature, self.critique_max_tokens = delimiter, critique_temperature, critique_max_tokens
        self.metrics: dict[str, float] = {}

    def _critiques(self, rollouts: Rollouts, ctx) -> list[list[Verdicts]]:
        prompts = rollouts.prompts or [""] * rollouts.batch_size
        if self.judge is None:  # "policy"
            critic = PolicyCritic(ctx, delimiter=self.delimiter, temperature=self.critique_temperature,
                                  max_new_tokens=self.critique_max_tokens)
            return critic.critiques(prompts, rollouts.completions, self.num_critiques)
        return [[self.judge(p, c) for _ in range(self.num_critiques)] for p, c in zip(prompts, rollouts.completions)]

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        tokenizer = getattr(ctx, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("capo_credit needs ctx.tokenizer in annotate() to map steps to tokens")
        b, width = rollouts.completion_ids.shape
        flags = torch.zeros(b, width)
        flagged_steps = torch.zeros(b)
        for i, critiques in enumerate(self._critiques(rollouts, ctx)):
            num_steps = len(split_steps(rollouts.completions[i], self.delimiter))
            f = vote(critiques, num_steps, self.voting)
            pieces = token_texts(tokenizer, completion_tokens(rollouts, i))
            if pieces and num_steps:
                steps = token_step_index(pieces, self.delimiter).clamp(max=num_steps - 1)
                flags[i, : len(pieces)] = f[steps]
            flagged_steps[i] = float((f > 0).sum())
        return {"capo_step_flags": flags, "capo_flagged_steps": flagged_steps}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "capo_credit")
        if "capo_step_flags" not in rollouts.extras:
            raise ValueError("capo_credit: rollouts.extras has no step flags; its annotate(rollouts, ctx) must run first")
        mask = rollouts.completion_mask.float()
        valid = ~torch.isnan(r)
        token_r = capo_token_rewards(torch.nan_to_num(r, nan=0.0), rollouts.extras["capo_step_flags"].float(),
                                     w_whole=self.w_whole, w_proc=self.w_proc)
        adv = token_group_normalise(token_r, mask, rollouts.group, valid, self.eps)
        correct = correctness(rollouts).bool()
        flagged = rollouts.extras["capo_flagged_steps"] > 0
        self.metrics = {
            "capo/flagged_rate_correct": float(flagged[correct].float().mean()) if correct.any() else 0.0,
            "capo/flagged_rate_incorrect": float(flagged[~correct].float().mean()) if (~correct).any() else 0.0,
        }
        return zero_failed(adv, rollouts)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)
