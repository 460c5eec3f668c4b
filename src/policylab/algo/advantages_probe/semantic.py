"""EMPO: semantic-entropy minimisation without labels (advantages_rewards.md B22).

Each rollout is rewarded by the share of its group whose final answer means the same thing; groups
whose answers are all different get nothing. The rewards the recipe computes (e.g. a gold verifier)
are used for monitoring only — except that a failed (NaN) reward still zeroes its row, as for every
advantage.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import correctness, zero_failed
from policylab.algo.group_stats import group_index, group_mean_std, nan_to_zero
from policylab.registry import register
from policylab.rewards.basic import last_number
from policylab.rollouts import Rollouts


def last_boxed(text: str) -> str:
    """Content of the last \\boxed{...} (balanced braces), or "" when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return ""
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return ""


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "boxed": last_boxed,
    "last_number": lambda text: last_number(text) or "",
    "full": lambda text: text.strip(),
}


def _numeric_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    except ValueError:
        return a == b


def _math_verify_equal(a: str, b: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(a), parse(b))) or bool(verify(parse(f"${a}$"), parse(f"${b}$")))
    except Exception:  # an unparsable answer is equal only to itself
        return a == b


EQUIVALENCES: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda a, b: a == b,
    "numeric": _numeric_equal,
    "math_verify": _math_verify_equal,
}


def cluster_answers(answers: list[str], equivalent: Callable[[str, str], bool]) -> list[int]:
    """Greedy clustering: each unassigned answer opens a cluster and absorbs later equivalent answers."""
    cluster = [-1] * len(answers)
    n = 0
    for i, a in enumerate(answers):
        if cluster[i] >= 0:
            continue
        cluster[i] = n
        for j in range(i + 1, len(answers)):
            if cluster[j] < 0 and (answers[j] == a or equivalent(a, answers[j])):
                cluster[j] = n
        n += 1
    return cluster


def semantic_entropy(cluster: list[int]) -> float:
    """H = −Σ_c P(c) ln P(c), P(c) = |c|/G."""
    g = len(cluster)
    sizes = [cluster.count(c) for c in set(cluster)]
    return -sum(s / g * math.log(s / g) for s in sizes) if g else 0.0


def rouge_l_precision(candidate: str, reference: str) -> float:
    """LCS(candidate words, reference words) / |candidate words| (0 for an empty candidate)."""
    a, b = candidate.split(), reference.split()
    if not a:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(a)


def empo_group_rewards(answers: list[str], equivalent: Callable[[str, str], bool], *, variant: str = "math",
                       question: str = "") -> tuple[list[float], float]:
    """(rewards r_i, semantic entropy H) of one group (B22).

    math: r_i = P(c(i)) if H < ln G (empty answer -> 0), else all 0. free_form: empty -> −0.5, answer
    copied from the question (ROUGE-L precision > 0.8 or substring) -> 0, largest cluster share < 0.2
    with more than one cluster -> 0, else P(c(i)).
    """
    g = len(answers)
    cluster = cluster_answers(answers, equivalent)
    h = semantic_entropy(cluster)
    share = [cluster.count(c) / g for c in cluster]
    if variant == "math":
        if not h < math.log(g) - 1e-9:
            return [0.0] * g, h
        return [0.0 if a == "" else p for a, p in zip(answers, share)], h
    if variant != "free_form":
        raise ValueError(f"empo variant must be 'math' or 'free_form', got {variant!r}")
    spread = max(share) < 0.2 and len(set(cluster)) > 1
    out = []
    for a, p in zip(answers, share):
        if a == "":
            out.append(-0.5)
        elif a in question or rouge_l_precision(a, question) > 0.8 or spread:
            out.append(0.0)
        else:
            out.append(p)
    return out, h


@register("advantage", "empo", spec="advantages_rewards.md B22")
class EMPOAdvantage:
    """EMPO: reward = frequency of the rollout's semantic answer cluster in its group; GRPO on top (eps 1e-4).

    ``extractor``: "boxed" (last \\boxed{}), "last_number" (arithmetic testbed) or "full" (free-form text);
    ``equivalence``: "math_verify" (math-verify ``verify``), "numeric" or "exact".
    """

    def __init__(self, extractor: str = "boxed", equivalence: str = "math_verify", variant: str = "math",
                 eps: float = 1e-4):
        if extractor not in EXTRACTORS:
            raise ValueError(f"empo extractor must be one of {sorted(EXTRACTORS)}, got {extractor!r}")
        if equivalence not in EQUIVALENCES:
            raise ValueError(f"empo equivalence must be one of {sorted(EQUIVALENCES)}, got {equivalence!r}")
        if variant not in ("math", "free_form"):
            raise ValueError(f"empo variant must be 'math' or 'free_form', got {variant!r}")
        self.extract, self.equivalent, self.variant, self.eps = EXTRACTORS[extractor], EQUIVALENCES[equivalence], variant, eps
        self.metrics: dict[str, float] = {}

    def semantic_rewards(self, rollouts: Rollouts) -> tuple[Tensor, list[float]]:
        answers = [self.extract(c) for c in rollouts.completions]
        rewards = torch.zeros(rollouts.batch_size)
        entropies = []
        idx, k = group_index(rollouts.group)
        for g in range(k):
            rows = (idx == g).nonzero().flatten().tolist()
            question = rollouts.prompts[rows[0]] if rollouts.prompts else ""
            r, h = empo_group_rewards([answers[i] for i in rows], self.equivalent, variant=self.variant, question=question)
            rewards[rows] = torch.tensor(r)
            entropies.append((h, len(rows)))
        return rewards, entropies

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        if len(rollouts.completions) != rollouts.batch_size:
            raise ValueError("empo needs the decoded completions (rollouts.completions)")
        r, entropies = self.semantic_rewards(rollouts)
        mean, std, _ = group_mean_std(r, rollouts.group)
        adv = nan_to_zero((r - mean) / (std + self.eps))
        self.metrics = {
            "empo/semantic_entropy": sum(h for h, _ in entropies) / max(1, len(entropies)),
            "empo/skipped_frac": sum(1.0 for h, g in entropies if g > 1 and not h < math.log(g) - 1e-9) / max(1, len(entropies)),
            "empo/mean_reward": float(r.mean()),
        }
        if rollouts.rewards is not None:
            self.metrics["empo/majority_accuracy"] = self._majority_accuracy(rollouts, r)
        return zero_failed(adv, rollouts)

    @staticmethod
    def _majority_accuracy(rollouts: Rollouts, semantic: Tensor) -> float:
        """Monitoring only: accuracy of the most frequent answer of each group (by the gold reward)."""
        correct = correctness(rollouts)
        idx, k = group_index(rollouts.group)
        hits = 0.0
        for g in range(k):
            rows = (idx == g).nonzero().flatten()
            hits += float(correct[rows[int(torch.argmax(semantic[rows]))]])
        return hits / max(1, k)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)
