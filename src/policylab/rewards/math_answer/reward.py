"""The ``math_verify`` reward: 1.0 when the completion's final answer matches ``row["answer"]`` (§C1)."""

from __future__ import annotations

from policylab.registry import register
from policylab.rewards.math_answer.core import VerifierOptions
from policylab.rewards.math_answer.pool import verify

_GOLD_FAILURES = ("no_gold",)


@register("reward", "math_verify", spec="data_agents_eval.md C1")
def math_verify(prompt: str, completion: str, row: dict, *, timeout_s: float = 10.0) -> float | None:
    """Rule-based math answer reward (data_agents_eval.md §C1, comparison policy §C1.3).

    Extracts the completion's final answer (last ``\\boxed{}``, answer phrases, LaTeX, plain numbers) and
    compares it with ``row["answer"]``: 1.0 if equivalent, 0.0 if not or on timeout.  ``timeout_s`` bounds
    the whole call; each parse and the comparison get ``min(5, timeout_s)`` seconds (C1.3 defaults: 5/5/10).
    The prompt is passed as the problem text so an inequality copied from it is not rewarded.
    An empty gold answer returns None (a failed sample: bad data, not a wrong completion); a gold the
    parser cannot read still scores 1.0 for a prediction written identically, else 0.0.
    """
    if "answer" not in row:
        raise KeyError("math_verify needs an 'answer' column in the task row")
    gold = row["answer"]
    if gold is None:
        return None
    if not isinstance(gold, str):
        gold = str(gold)
    stage = min(5.0, float(timeout_s))
    options = VerifierOptions(parse_timeout_s=stage, compare_timeout_s=stage, call_timeout_s=float(timeout_s))
    result = verify(gold, completion, problem=prompt, options=options)
    if result.reason in _GOLD_FAILURES:
        return None
    return result.score
