"""EMPO (arXiv:2504.05812): semantic-entropy minimisation without labels.

``annotate`` extracts each completion's final answer, clusters each group's answers by an equivalence
rule (math-verify, numeric, exact) and returns the share of the rollout's cluster as its semantic reward
(policylab/algo/advantages/semantic_entropy.py); ``__call__`` is GRPO on that reward. The rewards the
recipe computes (e.g. a gold verifier) are used for monitoring only — except that a failed (NaN)
reward still zeroes its row, as for every advantage.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from policylab.algo.advantages.semantic_entropy import empo_group_rewards, skipped
from policylab.algo.group_stats import correctness, group_index, group_mean_std, nan_to_zero, zero_failed
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rewards.basic import last_number
from policylab.rollouts import Rollouts

declare_field("empo_reward", per_row=True, shape="[B]", dtype="float", owner="advantage 'empo'",
              doc="share of the rollout's group whose final answer is equivalent to its own (0 for skipped groups)")


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


@register("advantage", "empo", spec="arXiv:2504.05812 (QingyangZhang/EMPO get_empo_math_reward)")
class EMPOAdvantage:
    """EMPO (arXiv:2504.05812): reward = frequency P(c) of the rollout's semantic answer cluster in its group
    when the group's semantic entropy H = −Σ P(c) ln P(c) is below ln G (else 0); GRPO on top (eps 1e-4).

    ``extractor``: "boxed" (last \\boxed{}), "last_number" (arithmetic testbed) or "full" (free-form text);
    ``equivalence``: "math_verify" (math-verify ``verify``), "numeric" or "exact"; ``variant="free_form"``
    adds the paper's penalties (empty −0.5, answer copied from the question 0, no cluster ≥ 20% → 0).
    """

    provides = ("empo_reward",)
    requires = ("rewards", "completions", "empo_reward")

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

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx=None) -> dict:
        if len(rollouts.completions) != rollouts.batch_size:
            raise ValueError("empo needs the decoded completions (rollouts.completions)")
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
        self.metrics = {
            "empo/semantic_entropy": sum(h for h, _ in entropies) / max(1, len(entropies)),
            "empo/skipped_frac": sum(1.0 for h, g in entropies if skipped(h, g)) / max(1, len(entropies)),
            "empo/mean_reward": float(rewards.mean()),
        }
        if rollouts.rewards is not None:
            self.metrics["empo/majority_accuracy"] = self._majority_accuracy(rollouts, rewards)
        return {"empo_reward": rewards}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        if "empo_reward" not in rollouts.extras:
            raise ValueError("empo: rollouts.extras has no semantic rewards; its annotate(rollouts, ctx) must run first")
        r = rollouts.extras["empo_reward"].float()
        mean, std, _ = group_mean_std(r, rollouts.group)
        return zero_failed(nan_to_zero((r - mean) / (std + self.eps)), rollouts)

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
