"""Rule-based math answer verification (data_agents_eval.md §C1; comparison policy §C1.3 is normative).

Pipeline: :mod:`.extract` (last ``\\boxed``/``\\fbox`` with brace matching, answer phrases, LaTeX
environments, plain numbers) → :mod:`.normalize` (spellings, digit grouping, units/percent/degrees) →
:mod:`.parse` (typed answers; scalars via SymPy) → :mod:`.compare` (C1.3) — with the time limits of
:mod:`.pool` (worker processes, no signals) and an in-process fast path for plain numbers (:mod:`.core`).

Public API::

    verify(gold, pred, *, problem=None, options=None, pool=None) -> VerifyResult
    verify_batch(golds, preds, *, problems=None, options=None, pool=None) -> list[VerifyResult]
    verify_local(gold, pred, ...)      # same pipeline in this process, no time limits
    score(response_text, gold, meta)   # the Verifier protocol of data_agents_eval.md §0.2 item 6
    verifier_metrics(results)          # C1 "Log": extraction/parse failure, timeout rates, reason counts

The registered reward is ``math_verify`` (:mod:`.reward`); the CLI is :func:`.cli.main_verify`.
"""

from policylab.rewards.math_answer.core import VerifierOptions, VerifyResult, verifier_metrics, verify_local
from policylab.rewards.math_answer.pool import VerifierPool, VerifierUnavailable, default_pool, verify, verify_batch


def score(response_text: str, gold: str, meta: dict | None = None) -> dict:
    """Verifier protocol of data_agents_eval.md §0.2 item 6: ``{score, correct, extracted, reason}``.

    ``meta["problem"]`` (optional) is the question text, used to reject a copied inequality.
    """
    result = verify(gold, response_text, problem=(meta or {}).get("problem"))
    return {"score": result.score, "correct": result.correct, "extracted": result.pred, "reason": result.reason}


__all__ = [
    "VerifyResult",
    "VerifierOptions",
    "VerifierPool",
    "VerifierUnavailable",
    "default_pool",
    "score",
    "verify",
    "verify_batch",
    "verify_local",
    "verifier_metrics",
]
