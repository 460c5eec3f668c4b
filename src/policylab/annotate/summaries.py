"""BRPO's budget summaries (arXiv:2505.13438): after each thinking budget the policy writes a short answer
summary, the recipe's rewards verify it, and (by default) the summaries join the batch as training rows.

A batch transform (it adds rows): ``transform`` cuts each trace at the budgets, samples the summaries
(continuations.py: they continue an exact token prefix), scores them with ``ctx.reward`` and computes the
advantages of policylab/algo/advantages/budget.py; ``__call__`` returns them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab import fields as F
from policylab.algo.advantages.budget import VARIANTS, brpo_advantages, budget_cuts, budget_weights
from policylab.algo.group_stats import zero_failed
from policylab.annotate.continuations import sample_continuations
from policylab.annotate.token_batches import completion_tokens, encode, pad_id_of, pad_left, pad_right, prompt_tokens
from policylab.registry import register
from policylab.rollouts import Rollouts

F.declare_field("brpo_adv", per_row=True, shape="[B,T]", dtype="float", owner="advantage 'brpo'",
                doc="BRPO advantage of each token: A^think on traces (by budget segment), A^sum on summary rows")
F.declare_field("brpo_is_summary", per_row=True, shape="[B]", dtype="bool", owner="advantage 'brpo'",
                doc="True on the summary rows BRPO appended to the batch")


@register("advantage", "brpo", spec="arXiv:2505.13438 (sail-sg/AnytimeReasoner brpo.py)")
class BRPOAdvantage:
    """BRPO (AnytimeReasoner, arXiv:2505.13438): dense budgeted rewards from summaries written after each
    thinking budget, with a budget-relative baseline.

    Budgets split ``max_budget`` (default: the batch's ``max_new_tokens``) evenly into ``num_budgets``; each
    cut gets ``summaries_per_budget`` summaries of at most ``summary_max_tokens`` after ``delimiter``, sampled
    at ``summary_temperature`` (default: the training temperature) and scored by the run's rewards. Thinking
    segment s of trace g gets R_{g,s} − (s·V1_{g,s} + (S−s)·V2_s)/S: R = prior-weighted future summary
    rewards, V1 = the trace's own discounted earlier rewards, V2 = the group's mean return. A summary gets
    its reward minus the mean at the same budget. ``train_summaries``: append the summaries as training
    rows (new groups, one per prompt and budget) with that advantage.
    """

    provides = ("brpo_adv", "brpo_is_summary")
    requires = ("rewards", "max_new_tokens", "brpo_adv")

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
        self.metrics: dict[str, float] = {}

    @torch.no_grad()
    def transform(self, rollouts: Rollouts, ctx) -> Rollouts:
        if ctx is None or getattr(ctx, "policy", None) is None or getattr(ctx, "tokenizer", None) is None:
            raise ValueError("brpo needs ctx.policy and ctx.tokenizer in transform() to write summaries")
        tok = ctx.tokenizer
        b, width = rollouts.completion_ids.shape
        max_budget = self.max_budget or int(rollouts.extras.get("max_new_tokens") or width)
        temperature = self.summary_temperature or ctx.temperature
        cuts = budget_cuts(max_budget, self.num_budgets)
        delim, pad, n_sum = encode(tok, self.delimiter), pad_id_of(tok), self.summaries_per_budget
        contexts, owners = [], []
        for i in range(b):
            ids = completion_tokens(rollouts, i)
            for cut in cuts:
                contexts.append(prompt_tokens(rollouts, i) + ids[:cut] + delim)
                owners.append(i)
        eos = getattr(tok, "eos_token_id", None)
        samples = sample_continuations(ctx.policy, contexts, num_samples=n_sum, max_new_tokens=self.summary_max_tokens,
                                       temperature=temperature, eos_id=eos, pad_id=pad, generator=self.generator,
                                       chunk=self.batch_size)
        texts = [tok.decode(x["tokens"], skip_special_tokens=True) for x in samples]
        rows = [rollouts.rows[i] if rollouts.rows else {} for i in owners for _ in range(n_sum)]
        prompts = [rollouts.prompts[i] if rollouts.prompts else "" for i in owners for _ in range(n_sum)]
        total, components = ctx.reward(prompts, texts, rows)
        summary_r = torch.nan_to_num(total.double(), nan=0.0).view(b, self.num_budgets, n_sum)
        think, summary_adv = brpo_advantages(summary_r, rollouts.group, self.prior, cuts, width, variant=self.variant,
                                             discount_base=self.discount_base)
        self.metrics = {f"brpo/acc_budget_{s}": float((summary_r[:, s] > 0.5).double().mean()) for s in range(self.num_budgets)}
        extras = dict(rollouts.extras, brpo_adv=think * rollouts.completion_mask,
                      brpo_is_summary=torch.zeros(b, dtype=torch.bool))
        base = rollouts.with_(extras=extras)
        if not self.train_summaries:
            return base
        summary_rows = self._summary_rollouts(base, contexts, samples, texts, prompts, rows, total, components,
                                              summary_adv.flatten().float(), pad, eos)
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
        for key, value in base.extras.items():  # other components' per-row fields: empty on the new rows
            if not F.lookup(key).per_row:
                extras[key] = value
            elif isinstance(value, Tensor):
                extras[key] = torch.zeros((n, *value.shape[1:]), dtype=value.dtype)
            else:
                extras[key] = [None] * n
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
            raise ValueError("brpo: rollouts.extras has no budget advantages; its transform(rollouts, ctx) must run first")
        return zero_failed(rollouts.extras["brpo_adv"].float() * rollouts.completion_mask, rollouts)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
