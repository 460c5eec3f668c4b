"""EMPO's semantic-entropy rewards (arXiv:2504.05812), given extracted answers and an equivalence rule.

Each rollout is rewarded by the share of its group whose final answer means the same thing; groups whose
answers are all different get nothing. Answer extraction and the equivalence checkers (math-verify, ...)
are verifier code and live with the annotator (policylab/annotate/semantic_clusters.py).
Exact from QingyangZhang/EMPO ``rewards.py`` (``get_empo_math_reward``, ``get_empo_common_reward``).
"""

from __future__ import annotations

import math
from typing import Callable


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
    """(rewards r_i, semantic entropy H) of one group.

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


def skipped(entropy: float, size: int) -> bool:
    """Whether a group of ``size`` answers gets no reward (H = ln G: all answers differ)."""
    return size > 1 and not entropy < math.log(size) - 1e-9
