"""BRPO — Budget Relative Policy Optimization for anytime reasoning (advantages_rewards.md B19).

Each thinking trace is cut at S budgets; after every cut the policy writes a short answer summary that
is verified. Thinking tokens of segment s get A = R_{g,s} − b_{g,s}, a baseline mixing the trace's own
earlier rewards (V1) and the group's mean future return (V2); summary tokens get their reward minus the
mean at the same budget. ``prepare`` generates and scores the summaries and (by default) appends them
as extra training rows, flagged in ``extras['brpo_is_summary']``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import (
    completion_tokens,
    encode,
    pad_id_of,
    pad_left,
    pad_right,
    prompt_tokens,
    sample_continuations,
    zero_failed,
)
from policylab.algo.group_stats import group_index
from policylab.registry import register
from policylab.rollouts import Rollouts

VARIANTS = ("brpo", "v1only", "v2only", "none")


def budget_weights(num_budgets: int, kind: str = "uniform") -> Tensor:
    """p_s over the S budgets: "uniform" (1/S) or "linear" (∝ s+1); the released "base" prior is not recovered."""
    if num_budgets < 1:
        raise ValueError(f"brpo needs num_budgets >= 1, got {num_budgets}")
    if kind == "uniform":
        return torch.full((num_budgets,), 1.0 / num_budgets, dtype=torch.float64)
    if kind == "linear":
        w = torch.arange(1, num_budgets + 1, dtype=torch.float64)
        return w / w.sum()
    raise ValueError(f"brpo budget_prior must be 'uniform' or 'linear', got {kind!r}")


def brpo_think_advantages(r: Tensor, prior: Tensor, *, variant: str = "brpo", discount_base: float = 2.0) -> Tensor:
    """A^think [G,S] from per-budget summary rewards r [G,S] of one prompt's G traces (B19).

    R_{g,s} = Σ_{j≥s} p_j r_{g,j}; V2_s = mean_g R_{g,s} (0 if G = 1); V1_{g,0} = 0, V1_{g,s} =
    (Σ_{j<s} base^j r_{g,j} / Σ_{j<s} base^j)·Σ_{j≥s} p_j; b = (s·V1 + (S−s)·V2)/S (s 0-based), or V1 /
    V2 / 0 for the v1only / v2only / none variants.
    """
    if variant not in VARIANTS:
        raise ValueError(f"brpo variant must be one of {VARIANTS}, got {variant!r}")
    r, p = r.double(), prior.double()
    g, s_count = r.shape
    tail = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])  # Σ_{j≥s} p_j
    returns = torch.flip(torch.cumsum(torch.flip(r * p, [1]), 1), [1])
    v2 = returns.mean(0, keepdim=True).expand(g, s_count) if g > 1 else torch.zeros_like(returns)
    v1 = torch.zeros_like(returns)
    weights = discount_base ** torch.arange(s_count, dtype=torch.float64)
    for s in range(1, s_count):
        v1[:, s] = (r[:, :s] * weights[:s]).sum(-1) / weights[:s].sum() * tail[s]
    steps = torch.arange(s_count, dtype=torch.float64)
    baseline = {"brpo": (steps * v1 + (s_count - steps) * v2) / s_count, "v1only": v1, "v2only": v2,
                "none": torch.zeros_like(returns)}[variant]
    return returns - baseline


def brpo_summary_advantages(rewards: Tensor) -> Tensor:
    """A^sum [G,S,A] = r − mean of the A summaries of the same trace and budget; with A = 1, the mean over
    the G traces at that budget (B19)."""
    if rewards.shape[-1] > 1:
        return rewards - rewards.mean(-1, keepdim=True)
    return rewards - rewards.mean(0, keepdim=True)


@register("advantage", "brpo", spec="advantages_rewards.md B19")
class BRPOAdvantage:
    """BRPO (AnytimeReasoner): dense budgeted rewards from summaries written after each thinking budget.

    Budgets split ``max_budget`` (default: the run's ``rollout.max_new_tokens``) evenly into
    ``num_budgets``; each cut gets ``summaries_per_budget`` summaries of at most ``summary_max_tokens``
    after ``delimiter``, sampled at ``summary_temperature`` (default: the rollout temperature) and scored
    by the recipe's rewards. ``train_summaries``: append the summaries as training rows with A^sum.
    """

    def __init__(self, num_budgets: int = 4, budget_prior: str = "uniform", summaries_per_budget: int = 1,
                 summary_max_tokens: int = 128, delimiter: str = "\n\n**Final Answer**\n", discount_base: float = 2.0,
                 variant: str = "brpo", summary_temperature: float | None = None, train_summaries: bool = True,
                 max_budget: int | None = None, batch_size: int = 32, seed: int = 0):
        self.prior = budget_weights(num_budgets, budget_prior)
        if variant not in VARIANTS:
            raise ValueError(f"brpo variant must be one of {VARIANTS}, got {variant!r}")
        if summary_max_tokens < 1:
            raise ValueError(f"brpo summary_max_tokens must be >= 1, got {summary_max_tokens}")
        if summaries_per_budget < 1:
            raise ValueError(f"brpo summaries_per_budget must be >= 1, got {summaries_per_budget}")
        self.num_budgets, self.summaries_per_budget, self.summary_max_tokens = num_budgets, summaries_per_budget, summary_max_tokens
        self.delimiter, self.discount_base, self.variant = delimiter, discount_base, variant
        self.summary_temperature, self.train_summaries, self.max_budget, self.batch_size = summary_temperature, train_summaries, max_budget, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._combiner = None
        self.metrics: dict[str, float] = {}

    def budgets(self, max_budget: int) -> list[int]:
        return [math.ceil((s + 1) * max_budget / self.num_budgets) for s in range(self.num_budgets)]

    def _settings(self, ctx, width: int) -> tuple[int, float]:
        cfg = getattr(ctx, "config", None)
        rollout = getattr(cfg, "rollout", None)
        max_budget = self.max_budget or (rollout.max_new_tokens if rollout is not None else width)
        temperature = self.summary_temperature or (rollout.temperature if rollout is not None and rollout.temperature > 0 else 1.0)
        return max_budget, temperature

    def _rewards(self, ctx):
        if self._combiner is None:
            cfg = getattr(ctx, "config", None)
            if cfg is None:
                raise ValueError("brpo needs ctx.config (the recipe) to score summaries with the recipe's rewards")
            from policylab.rewards.combine import RewardCombiner

            self._combiner = RewardCombiner(cfg.rewards)
        return self._combiner

    @torch.no_grad()
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if ctx is None or getattr(ctx, "model", None) is None or getattr(ctx, "tokenizer", None) is None:
            raise ValueError("brpo needs ctx.model and ctx.tokenizer in prepare() to write summaries")
        model, tok = ctx.model, ctx.tokenizer
        b, width = rollouts.completion_ids.shape
        max_budget, temperature = self._settings(ctx, width)
        cuts = self.budgets(max_budget)
        delim, pad, n_sum = encode(tok, self.delimiter), pad_id_of(tok), self.summaries_per_budget
        contexts, owners = [], []
        for i in range(b):
            ids = completion_tokens(rollouts, i)
            for s, cut in enumerate(cuts):
                contexts.append(prompt_tokens(rollouts, i) + ids[:cut] + delim)
                owners.append((i, s))
        samples = sample_continuations(model, contexts, num_samples=n_sum, max_new_tokens=self.summary_max_tokens,
                                       temperature=temperature, eos_id=getattr(tok, "eos_token_id", None), pad_id=pad,
                                       generator=self.generator, chunk=self.batch_size)
        texts = [tok.decode(x["tokens"], skip_special_tokens=True) for x in samples]
        rows = [rollouts.rows[i] if rollouts.rows else {} for i, _ in owners for _ in range(n_sum)]
        prompts = [rollouts.prompts[i] if rollouts.prompts else "" for i, _ in owners for _ in range(n_sum)]
        total, components = self._rewards(ctx)(prompts, texts, rows)
        summary_r = torch.nan_to_num(total.double(), nan=0.0).view(b, self.num_budgets, n_sum)

        think = torch.zeros(b, width)
        summary_adv = torch.zeros(b, self.num_budgets, n_sum, dtype=torch.float64)
        segment = torch.bucketize(torch.arange(width), torch.tensor(cuts), right=True).clamp(max=self.num_budgets - 1)
        idx, k = group_index(rollouts.group)
        for g in range(k):
            members = (idx == g).nonzero().flatten()
            a_think = brpo_think_advantages(summary_r[members].mean(-1), self.prior, variant=self.variant,
                                            discount_base=self.discount_base)
            think[members] = a_think[:, segment].float()
            summary_adv[members] = brpo_summary_advantages(summary_r[members])
        self.metrics = {f"brpo/acc_budget_{s}": float((summary_r[:, s] > 0.5).double().mean()) for s in range(self.num_budgets)}
        extras = dict(rollouts.extras, brpo_adv=think * rollouts.completion_mask, brpo_is_summary=torch.zeros(b, dtype=torch.bool))
        base = rollouts.with_(extras=extras)
        if not self.train_summaries:
            return base
        summary_rows = self._summary_rollouts(base, contexts, samples, texts, prompts, rows, total, components,
                                              summary_adv.flatten().float(), pad, getattr(tok, "eos_token_id", None))
        return Rollouts.concat([base, summary_rows])

    def _summary_rollouts(self, base: Rollouts, contexts, samples, texts, prompts, rows, total, components, adv, pad,
                          eos_id) -> Rollouts:
        n = len(samples)
        flat_contexts = [c for c in contexts for _ in range(self.summaries_per_budget)]
        p_ids, p_mask = pad_left(flat_contexts, pad)
        c_ids, c_mask = pad_right([x["tokens"] for x in samples], pad)
        if c_ids.shape[1] == 0:
            c_ids, c_mask = torch.full((n, 1), pad, dtype=torch.long), torch.zeros(n, 1)
        behaviour = torch.zeros_like(c_mask)
        entropy = torch.zeros_like(c_mask)
        for j, x in enumerate(samples):
            behaviour[j, : len(x["tokens"])] = x["logp"]
            entropy[j, : len(x["tokens"])] = x["entropy"]
        owner_groups = base.group.repeat_interleave(self.num_budgets * self.summaries_per_budget)
        budget_ids = torch.arange(self.num_budgets).repeat_interleave(self.summaries_per_budget).repeat(base.batch_size)
        # summary groups never mix with the traces' groups: one fresh id per (prompt, budget)
        group = int(base.group.max()) + 1 + owner_groups * self.num_budgets + budget_ids
        truncated = torch.tensor([len(x["tokens"]) >= self.summary_max_tokens and x["tokens"][-1] != eos_id
                                  for x in samples], dtype=torch.bool)
        extras = {}
        for key, value in base.extras.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == base.batch_size:
                extras[key] = torch.zeros((n, *value.shape[1:]), dtype=value.dtype)
            else:
                extras[key] = value
        extras["brpo_adv"] = adv[:, None] * c_mask
        extras["brpo_is_summary"] = torch.ones(n, dtype=torch.bool)
        return Rollouts(
            prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask, group=group, truncated=truncated,
            prompts=prompts, completions=texts, rows=rows, rewards=total.float(), reward_components=components,
            behavior_logp=behaviour if base.behavior_logp is not None else None,
            entropy=entropy if base.entropy is not None else None, extras=extras,
        )

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        if "brpo_adv" not in rollouts.extras:
            raise ValueError("brpo: rollouts.extras has no budget advantages; the loop must call prepare(rollouts, ctx) first")
        return zero_failed(rollouts.extras["brpo_adv"].float() * rollouts.completion_mask, rollouts)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
