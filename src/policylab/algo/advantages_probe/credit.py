"""CAPO credit: judged step flags become token-level process penalties (advantages_rewards.md B23)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import completion_tokens, correctness, require_rewards, token_texts, zero_failed
from policylab.algo.advantages_probe.step_judges import PolicyCritic, Verdicts, resolve_judge, split_steps
from policylab.algo.group_stats import group_index
from policylab.registry import register
from policylab.rollouts import Rollouts

VOTING = ("majority", "intersection", "average")


def vote(critiques: Sequence[Verdicts], num_steps: int, mode: str = "majority") -> Tensor:
    """Per-step flag f_k from K critiques (unparsable ones are left out): majority (> K/2), intersection
    (flagged by all), or average (fraction flagging). No usable critique -> no flags."""
    if mode not in VOTING:
        raise ValueError(f"capo voting must be one of {VOTING}, got {mode!r}")
    usable = [c for c in critiques if c is not None]
    if not usable or num_steps == 0:
        return torch.zeros(num_steps)
    flagged = torch.zeros(num_steps)
    for c in usable:
        for k in range(min(num_steps, len(c))):
            flagged[k] += 0.0 if c[k] else 1.0
    k_total = len(usable)
    if mode == "average":
        return flagged / k_total
    if mode == "majority":
        return (flagged > k_total / 2).float()
    return (flagged == k_total).float()


def token_step_index(pieces: Sequence[str], delimiter: str) -> Tensor:
    """[len(pieces)] step of each token, steps as ``text.split(delimiter)`` makes them (token start offset)."""
    text = "".join(pieces)
    ends, pos = [], 0
    while delimiter:
        hit = text.find(delimiter, pos)
        if hit < 0:
            break
        pos = hit + len(delimiter)
        ends.append(pos)
    index, offset = [], 0
    for piece in pieces:
        index.append(sum(1 for e in ends if e <= offset))
        offset += len(piece)
    return torch.tensor(index, dtype=torch.long)


def capo_token_rewards(outcome: Tensor, flags: Tensor, *, w_whole: float = 2.0, w_proc: float = 1.0) -> Tensor:
    """R[i,t] = W_whole·r_i − W_proc·f[i,t] (f = the vote of the step holding token t)."""
    return w_whole * outcome[:, None] - w_proc * flags


def token_group_normalise(values: Tensor, mask: Tensor, group: Tensor, valid_rows: Tensor, eps: float = 1e-6) -> Tensor:
    """(R − m_g)/(s_g + eps), m_g and unbiased s_g over all valid tokens of the group's valid rows.
    A group with one rollout uses m = 0, s = 1 (§0 singleton convention); fewer than two tokens: s = 1."""
    out = torch.zeros_like(values)
    idx, k = group_index(group)
    for g in range(k):
        rows = ((idx == g) & valid_rows).nonzero().flatten()
        if rows.numel() == 0:
            continue
        tokens = values[rows][mask[rows] > 0]
        if rows.numel() == 1 or tokens.numel() < 2:
            mean, std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean, std = tokens.mean(), tokens.std()
        out[rows] = (values[rows] - mean) / (std + eps)
    return out * mask


@register("advantage", "capo_credit", spec="advantages_rewards.md B23")
class CAPOCreditAdvantage:
    """CAPO credit: K critiques list flawed steps; votes f give token rewards R = W_whole·r − W_proc·f,
    normalised over all valid tokens of the group.

    ``judge``: a step judge (see step_judges.py): "arithmetic" (rule-checks "a + b = c" claims; the
    testbed's), "policy" (the policy model critiques once per call, temperature ``critique_temperature``),
    "none", "module:attr", or a callable. Steps are ``completion.split(delimiter)``.
    Reconstructed from the abstract: W_whole = 2, W_proc = 1, K = 4, majority voting are our defaults
    (W_whole > W_proc keeps every correct answer above every wrong one).
    """

    def __init__(self, judge="arithmetic", num_critiques: int = 4, voting: str = "majority", w_whole: float = 2.0,
                 w_proc: float = 1.0, eps: float = 1e-6, delimiter: str = "\n\n", critique_temperature: float = 0.7,
                 critique_max_tokens: int = 64, seed: int = 0):
        if voting not in VOTING:
            raise ValueError(f"capo voting must be one of {VOTING}, got {voting!r}")
        if num_critiques < 1:
            raise ValueError(f"capo num_critiques must be >= 1, got {num_critiques}")
        self.judge_spec, self.judge = judge, resolve_judge(judge, delimiter=delimiter)
        self.num_critiques, self.voting, self.w_whole, self.w_proc, self.eps = num_critiques, voting, w_whole, w_proc, eps
        self.delimiter, self.critique_temperature, self.critique_max_tokens = delimiter, critique_temperature, critique_max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics: dict[str, float] = {}

    def _judge(self, ctx):
        if self.judge is not None:
            return self.judge
        if ctx is None or getattr(ctx, "model", None) is None:
            raise ValueError("capo_credit judge 'policy' needs ctx.model and ctx.tokenizer in prepare()")
        return PolicyCritic(ctx.model, ctx.tokenizer, delimiter=self.delimiter, temperature=self.critique_temperature,
                            max_new_tokens=self.critique_max_tokens, generator=self.generator)

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        judge = self._judge(ctx)
        tokenizer = getattr(ctx, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("capo_credit needs ctx.tokenizer in prepare() to map steps to tokens")
        b, width = rollouts.completion_ids.shape
        flags = torch.zeros(b, width)
        flagged_steps = torch.zeros(b)
        for i in range(b):
            text = rollouts.completions[i]
            num_steps = len(split_steps(text, self.delimiter))
            with torch.no_grad():
                critiques = [judge(rollouts.prompts[i], text) for _ in range(self.num_critiques)]
            f = vote(critiques, num_steps, self.voting)
            pieces = token_texts(tokenizer, completion_tokens(rollouts, i))
            if pieces:
                steps = token_step_index(pieces, self.delimiter).clamp(max=max(0, num_steps - 1))
                flags[i, : len(pieces)] = f[steps] if num_steps else 0.0
            flagged_steps[i] = float((f > 0).sum())
        return rollouts.with_(extras=dict(rollouts.extras, capo_step_flags=flags, capo_flagged_steps=flagged_steps))

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = require_rewards(rollouts, "capo_credit")
        if "capo_step_flags" not in rollouts.extras:
            raise ValueError("capo_credit: rollouts.extras has no step flags; the loop must call prepare(rollouts, ctx) first")
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

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
