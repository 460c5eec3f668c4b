"""Group-level reward shaping with judges: ArenaRL tournaments (arXiv:2601.06487) and FAPO's
flawed-positive penalty (arXiv:2510.22543). The step judges they use live in ``rewards/judges/steps.py``.

Per-sample rewards of the same section live elsewhere and are reused, not duplicated: SSL tiers and
RL-Struct are rewards in rewards/structure.py, OTC (with its per-question optimum) is the ``otc``
reward_shaping there, G-RA is ``gated_reward`` in rewards/gating.py. ReBel (C3) and SPA-RL (C8) wait for
the multi-turn engine.

Both stages here change ``rollouts.rewards`` through the reward_shaping contract (a delta added to
the rewards); ``mode="replace"`` makes the shaped value the reward, as in the papers.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import Tensor

from policylab.algo.group_stats import correctness, group_index
from policylab.registry import register
from policylab.rewards.basic import last_number
from policylab.rewards.judges.steps import first_flawed_step, llm_judge, resolve_judge
from policylab.rollouts import Rollouts

# -- ArenaRL (C2) ---------------------------------------------------------------------------------------------

Compare = Callable[[int, int], float]  # (row a, row b) -> P(a ≻ b), position as asked


def debiased(compare: Compare, a: int, b: int) -> float:
    """J̄(a,b) = ½(J(a,b) + 1 − J(b,a)): both presentation orders, position bias removed."""
    return 0.5 * (compare(a, b) + 1.0 - compare(b, a))


def bracket_order(size: int) -> list[int]:
    """Seed numbers (1-based) in bracket order for a power-of-two ``size``: 1 v size in the first slot,
    the top two seeds in opposite halves (4 -> [1,4,2,3], 8 -> [1,8,4,5,2,7,3,6])."""
    order = [1]
    while len(order) < size:
        n = 2 * len(order)
        order = [x for s in order for x in (s, n + 1 - s)]
    return order


def single_elimination(seeds: list[int], beats: Callable[[int, int], bool]) -> tuple[list[int], int, int]:
    """Wins per player of a seeded single-elimination bracket, matches played, and upsets (worse seed won).

    ``seeds[k]`` = the player with seed k+1. Pads to the next power of two with byes (an automatic win,
    no match). ``beats(higher, lower)`` decides a match between a better and a worse seed.
    """
    n = len(seeds)
    wins = [0] * n
    if n < 2:
        return wins, 0, 0
    size = 2 ** math.ceil(math.log2(n))
    rank = {player: k for k, player in enumerate(seeds)}
    slots = [seeds[s - 1] if s <= n else None for s in bracket_order(size)]
    played = upsets = 0
    while len(slots) > 1:
        nxt = []
        for a, b in zip(slots[0::2], slots[1::2]):
            if a is None or b is None:
                winner = a if b is None else b
            else:
                high, low = (a, b) if rank[a] < rank[b] else (b, a)
                winner = high if beats(high, low) else low
                played += 1
                upsets += winner == low
            if winner is not None:
                wins[winner] += 1
            nxt.append(winner)
        slots = nxt
    return wins, played, upsets


def tournament_advantage(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """(u − mean u)/(std u + eps), unbiased std; one player -> 0."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (scores.std() + eps)


def _closeness_judge(prompt: str, a: str, b: str, row: dict) -> float:
    """A rule judge for numeric tasks: the answer nearer to ``row['answer']`` wins (missing answers lose)."""
    gold = float(str(row["answer"]).replace(",", ""))

    def distance(text: str) -> float:
        got = last_number(text)
        return abs(float(got) - gold) if got is not None else math.inf

    da, db = distance(a), distance(b)
    return 0.5 if da == db else float(da < db)


def _llm_pairwise(options: dict, criterion: str, rubric_key: str):
    from policylab.rewards.judges.verdicts import PAIRWISE_TEMPLATE, parse_choice

    judge = llm_judge(options)
    value = {"A": 1.0, "B": 0.0, "TIE": 0.5}

    def compare(prompt: str, a: str, b: str, row: dict) -> float | None:
        text = PAIRWISE_TEMPLATE.format(question=prompt, a=a, b=b, criterion=str(row.get(rubric_key, criterion)))
        votes = [v for v in (judge.ask(text, parse_choice) or []) if v is not None]
        return sum(value[v] for v in votes) / len(votes) if votes else None

    return compare


def pairwise_judge(spec, *, criterion: str, rubric_key: str):
    """"reward" (compare the rollouts' rewards), "closeness" (numeric distance to the gold answer),
    "module:attr" or a callable ``(prompt, a, b, row) -> P(a ≻ b)``, or a mapping of LLM-judge options."""
    if callable(spec) or spec == "reward":
        return spec
    if spec == "closeness":
        return _closeness_judge
    if isinstance(spec, dict):
        return _llm_pairwise(spec, criterion, rubric_key)
    if isinstance(spec, str) and ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import pairwise judge {spec!r}: {err}") from None
    raise ValueError(f"unknown pairwise judge {spec!r}: use 'reward', 'closeness', 'module:attr', a mapping of "
                     "LLM-judge options or a callable")


@register("reward_shaping", "arena_rl", spec="arXiv:2601.06487 (seeded single elimination; rank->score map ours)")
class ArenaRLShaping:
    """ArenaRL (arXiv:2601.06487): each group plays a seeded single-elimination tournament judged pairwise (both orders,
    position-debiased); u_i = wins_i / ⌈log2 N⌉ (byes count as wins) becomes the reward (``mode="replace"``,
    so GRPO on top gives A = (u − mean)/std) or is added with ``weight`` (``mode="add"``).

    Seeds: σ_i = J̄(o_i, anchor), anchor = the group's first rollout (``seeding="anchor"``), or the
    verifiable reward (``"reward"``), ties to the lower index; a match J̄ = 0.5 goes to the higher seed.
    Judge calls per group ≤ 2·(N−1) for seeding plus 2 per match. Reconstructed from the abstract: the
    rank→score map and anchor seeding are ours. On arithmetic use judge "closeness" or "reward".
    """

    def __init__(self, judge: str | dict | Callable = "closeness", seeding: str = "anchor", mode: str = "replace", weight: float = 1.0,
                 criterion: str = "Which response solves the task more correctly and with sounder reasoning?",
                 rubric_key: str = "rubric"):
        if seeding not in ("anchor", "reward"):
            raise ValueError(f"arena_rl seeding must be 'anchor' or 'reward', got {seeding!r}")
        if mode not in ("replace", "add"):
            raise ValueError(f"arena_rl mode must be 'replace' or 'add', got {mode!r}")
        self.judge = pairwise_judge(judge, criterion=criterion, rubric_key=rubric_key)
        self.seeding, self.mode, self.weight = seeding, mode, weight
        self.calls = 0
        self.failures = 0

    def _compare(self, rollouts: Rollouts) -> Compare:
        rewards = torch.nan_to_num(rollouts.rewards.float(), nan=-math.inf)

        def compare(a: int, b: int) -> float:
            self.calls += 1
            if self.judge == "reward":
                return 0.5 if rewards[a] == rewards[b] else float(rewards[a] > rewards[b])
            row = rollouts.rows[a] if rollouts.rows else {}
            value = self.judge(rollouts.prompts[a], rollouts.completions[a], rollouts.completions[b], row)
            if value is None or not math.isfinite(float(value)):
                self.failures += 1
                return 0.5
            return min(1.0, max(0.0, float(value)))

        return compare

    def group_scores(self, rollouts: Rollouts, rows: list[int]) -> tuple[Tensor, int, int]:
        compare = self._compare(rollouts)
        if self.seeding == "anchor":
            anchor = rows[0]
            sigma = [0.5 if i == anchor else debiased(compare, i, anchor) for i in rows]
        else:
            sigma = torch.nan_to_num(rollouts.rewards[rows].float(), nan=-math.inf).tolist()
        order = sorted(range(len(rows)), key=lambda k: (-sigma[k], k))
        wins, played, upsets = single_elimination(order, lambda high, low: debiased(compare, rows[high], rows[low]) >= 0.5)
        rounds = math.ceil(math.log2(len(rows))) if len(rows) > 1 else 1
        return torch.tensor([w / rounds for w in wins], dtype=torch.float32), played, upsets

    def __call__(self, rollouts: Rollouts) -> tuple[Tensor, dict]:
        if rollouts.rewards is None:
            raise ValueError("arena_rl runs after the rewards: rollouts.rewards is None")
        scores = torch.zeros(rollouts.batch_size)
        upsets = matches = 0
        self.calls = self.failures = 0
        idx, k = group_index(rollouts.group)
        for g in range(k):
            rows = (idx == g).nonzero().flatten().tolist()
            u, played, upset = self.group_scores(rollouts, rows)
            scores[rows] = u
            matches += played
            upsets += upset
        rewards = rollouts.rewards.float()
        delta = scores - rewards if self.mode == "replace" else self.weight * scores
        delta = torch.where(torch.isnan(rewards), torch.zeros_like(delta), delta)
        return delta, {"arena/score_mean": float(scores.mean()), "arena/matches": float(matches),
                       "arena/judge_calls": float(self.calls), "arena/judge_failures": float(self.failures),
                       "arena/upset_rate": upsets / matches if matches else 0.0}


# -- FAPO (C6) -----------------------------------------------------------------------------------------------


@register("reward_shaping", "fapo", spec="arXiv:2510.22543 (flawed-positive penalty, verl recipe/fapo)")
class FAPOShaping:
    """FAPO (arXiv:2510.22543): a correct rollout whose reasoning a generative judge flags (earliest flawed step ≠ −1) loses
    ``penalty``; with ``base_reward="pm1"`` rewards become +1 / −1 first (released recipe: a flawed positive
    ends at 0, between clean positives and negatives). Only correct rollouts are judged; an unparsable
    verdict counts as not flawed. Judge: "arithmetic" (rule steps, the testbed's), "none", "module:attr",
    a callable ``(prompt, completion) -> per-step verdicts``, or a mapping of LLM-judge options.
    Then use any GRPO-style advantage. Correct = the ``accuracy`` component (policylab.algo.group_stats.correctness)
    when the batch has one, else reward >= ``correct_threshold`` (inclusive, as the released reward function).
    """

    def __init__(self, judge: str | dict | Callable = "arithmetic", penalty: float = 1.0, base_reward: str = "pm1", correct_threshold: float = 0.5,
                 delimiter: str = "\n\n", tail_chars: int | None = None):
        if base_reward not in ("pm1", "keep"):
            raise ValueError(f"fapo base_reward must be 'pm1' or 'keep', got {base_reward!r}")
        self.judge = resolve_judge(judge, delimiter=delimiter)
        if self.judge is None:
            raise ValueError("fapo cannot use judge 'policy' (reward shaping runs before the annotators, without the model)")
        self.penalty, self.base_reward, self.threshold, self.tail_chars = penalty, base_reward, correct_threshold, tail_chars

    def __call__(self, rollouts: Rollouts) -> tuple[Tensor, dict]:
        if rollouts.rewards is None:
            raise ValueError("fapo runs after the rewards: rollouts.rewards is None")
        rewards = rollouts.rewards.float()
        if "accuracy" in rollouts.reward_components:
            correct = correctness(rollouts)
        else:
            correct = (torch.nan_to_num(rewards, nan=-math.inf) >= self.threshold).float()
        flawed = torch.zeros_like(rewards)
        unparsable = 0
        for i in correct.nonzero().flatten().tolist():
            text = rollouts.completions[i]
            if self.tail_chars:
                text = text[-self.tail_chars :]
            verdicts = self.judge(rollouts.prompts[i] if rollouts.prompts else "", text)
            unparsable += verdicts is None
            flawed[i] = float(first_flawed_step(verdicts) != -1)
        base = 2 * correct - 1 if self.base_reward == "pm1" else rewards
        delta = base - self.penalty * flawed - rewards
        delta = torch.where(torch.isnan(rewards), torch.zeros_like(delta), delta)
        n_correct = float(correct.sum())
        return delta, {"fapo/flawed_positive_rate": float(flawed.sum()) / n_correct if n_correct else 0.0,
                       "fapo/unparsable_rate": unparsable / n_correct if n_correct else 0.0}


# -- RL-Struct adapter (C7) ---------------------------------------------------------------------------------


@register("reward", "rl_struct_fixed_schema", spec="arXiv:2512.00319 (four-term structured-output reward)")
def rl_struct_fixed_schema(prompt: str, completion: str, row: dict, *, schema: dict | None = None, w_valid: float = 0.25,
                           w_struct: float = 0.25, w_format: float = 0.25, w_content: float = 0.25,
                           gold_key: str = "answer", answer_field: str = "answer", format_over: str = "schema") -> float:
    """The ``rl_struct`` reward (rewards/structure.py) for tasks whose rows carry no schema: the recipe gives
    one schema for every row (default ``{"answer": "number"}``); gold values from ``row[gold_key]`` (a dict,
    JSON text, or a scalar standing for ``{answer_field: scalar}``). Same four terms, same weights.
    (Adapter only: the terms are ``structure.rl_struct_components``; a ``schema=`` option on ``rl_struct``
    itself would make this unnecessary.)
    """
    import json

    from policylab.rewards.structure import rl_struct_components

    gold = row.get(gold_key)
    if isinstance(gold, str):
        try:
            gold = json.loads(gold)
        except ValueError:
            pass
    if gold is not None and not isinstance(gold, dict):
        gold = {answer_field: gold}
    terms = rl_struct_components(completion, schema or {"answer": "number"}, gold, format_over=format_over)
    content_weight = w_content if gold is not None else 0.0
    return (w_valid * terms["valid"] + w_struct * terms["struct"] + w_format * terms["format"]
            + content_weight * terms["content"])
