"""The verification pipeline without isolation: extract → (fast path) → parse → compare (§C1.1).

:func:`verify_local` runs everything in the calling process with no time limit; it is what the worker
processes of :mod:`.pool` run, and what tests use to check the pure-function property.  The public
:func:`policylab.rewards.math_answer.verify` adds the process-pool timeouts.

The fast path (:func:`quick_verdict`) settles pairs of plain numbers (integers, decimals, ``a/b``,
``\\frac{a}{b}``, thousands commas) with :class:`fractions.Fraction` — no SymPy, no worker — under exactly
the same C1.3 number rule, so most rewards of an arithmetic task never leave the trainer process.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Callable

from policylab.rewards.math_answer.extract import Extraction, extract_answer, extract_gold
from policylab.rewards.math_answer.numbers import decimal_rule, fraction_to_decimal


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one verification.

    ``gold``/``pred`` are the extracted answer strings that were compared (None when nothing was
    extracted); ``reason`` names the rule that matched or why the answer failed (``"timeout"`` when a
    time limit was hit).
    """

    score: float
    correct: bool
    gold: str | None
    pred: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VerifierOptions:
    """Knobs of the verifier; defaults are data_agents_eval.md §C1.3's.

    Scores: ``correct_score``/``wrong_score`` (DAPO style is +1/-1), ``timeout_score`` for timeouts.
    Limits: each parse, each comparison, and the whole call (process-pool enforced, see :mod:`.pool`).
    Extraction: ``window`` = how many trailing characters the non-box extraction rules search;
    ``think_end`` = end-of-thinking marker (text before its last occurrence is ignored; None: off).
    """

    parse_timeout_s: float = 5.0
    compare_timeout_s: float = 5.0
    call_timeout_s: float = 10.0
    correct_score: float = 1.0
    wrong_score: float = 0.0
    timeout_score: float = 0.0
    window: int = 4000
    think_end: str | None = "</think>"

    def __post_init__(self):
        for name in ("parse_timeout_s", "compare_timeout_s", "call_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"VerifierOptions.{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.window, int) or self.window <= 0:
            raise ValueError(f"VerifierOptions.window must be a positive int, got {self.window!r}")

    def result(self, correct: bool, gold: str | None, pred: str | None, reason: str) -> VerifyResult:
        score = self.correct_score if correct else self.wrong_score
        return VerifyResult(float(score), bool(correct), gold, pred, reason)

    def timeout(self, gold: str | None, pred: str | None) -> VerifyResult:
        return VerifyResult(float(self.timeout_score), False, gold, pred, "timeout")


DEFAULT_OPTIONS = VerifierOptions()


def _check_text(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"verify: {name} must be a str, got {type(value).__name__}")
    return value


def extract_pair(gold: str, pred: str, options: VerifierOptions = DEFAULT_OPTIONS) -> tuple[Extraction, Extraction]:
    """Gold and prediction extractions (cheap and bounded; always done in the calling process)."""
    _check_text("gold", gold)
    _check_text("pred", pred)
    return extract_gold(gold), extract_answer(pred, window=options.window, think_end=options.think_end)


def early_result(gold_ex: Extraction, pred_ex: Extraction, options: VerifierOptions) -> VerifyResult | None:
    """The result when extraction alone decides it (no gold / no answer), else None."""
    gold_str = gold_ex.candidates[0] if gold_ex.found else None
    if not gold_ex.found:
        return options.result(False, None, pred_ex.candidates[0] if pred_ex.found else None, "no_gold")
    if not pred_ex.found:
        return options.result(False, gold_str, None, pred_ex.rule)
    return None


# ---------------------------------------------------------------------------------------------------------
# fast path: plain numbers
# ---------------------------------------------------------------------------------------------------------

_PLAIN_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_MAX_FAST_CHARS = 40


def simple_number(text: str) -> tuple[Fraction, bool] | None:
    """``(value, written_as_decimal)`` for a plain number string, or None if it is anything else."""
    text = text.strip()
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    text = text.rstrip(".,; ").strip() if not re.fullmatch(r"[+-]?\.\d+", text) else text
    if not text or len(text) > _MAX_FAST_CHARS:
        return None
    if _GROUPED.fullmatch(text):
        text = text.replace(",", "")
    if _PLAIN_DECIMAL.fullmatch(text):
        return Fraction(text), "." in text
    match = _SLASH_FRACTION.fullmatch(text)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2))), False
    match = _LATEX_FRACTION.fullmatch(text)
    if match and int(match.group(3)) != 0:
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return (-value if match.group(1) else value), False
    return None


def quick_verdict(gold: str, pred: str) -> tuple[bool, str] | None:
    """(equal, reason) for two plain numbers under the C1.3 number rule, or None (needs the full path)."""
    parsed_gold, parsed_pred = simple_number(gold), simple_number(pred)
    if parsed_gold is None or parsed_pred is None:
        return None
    (gold_value, gold_decimal), (pred_value, pred_decimal) = parsed_gold, parsed_pred
    if gold_value == pred_value:
        return True, "exact"
    if not (gold_decimal or pred_decimal):
        return False, "not_equal"
    reason = decimal_rule(fraction_to_decimal(gold_value), fraction_to_decimal(pred_value))
    return (True, reason) if reason else (False, "not_equal")


def fast_result(gold_ex: Extraction, pred_ex: Extraction, options: VerifierOptions) -> VerifyResult | None:
    """A finished result for plain-number pairs, or None."""
    early = early_result(gold_ex, pred_ex, options)
    if early is not None:
        return early
    gold_str, pred_str = gold_ex.candidates[0], pred_ex.candidates[0]
    verdict = quick_verdict(gold_str, pred_str)
    if verdict is None:
        return None
    return options.result(verdict[0], gold_str, pred_str, verdict[1])


# ---------------------------------------------------------------------------------------------------------
# full path: parse + compare
# ---------------------------------------------------------------------------------------------------------


def judge(
    gold_candidates: tuple[str, ...] | list[str],
    pred_candidates: tuple[str, ...] | list[str],
    problem: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[bool, str, str | None, str | None]:
    """Parse the candidates (first that parses wins) and compare: (equal, reason, gold_used, pred_used).

    ``on_stage("parse")``/``on_stage("compare")`` is called before each parse and the comparison so a
    supervising process can time each step (C1.3 Timeouts).
    """
    from policylab.rewards.math_answer.compare import equivalent
    from policylab.rewards.math_answer.parse import Unparsed, parse_answer

    def first_parsed(candidates):
        first = None
        for candidate in candidates:
            if on_stage:
                on_stage("parse")
            answer = parse_answer(candidate)
            if not isinstance(answer, Unparsed):
                return candidate, answer
            if first is None:
                first = (candidate, answer)
        return first

    gold_used, gold_answer = first_parsed(gold_candidates)
    pred_used, pred_answer = first_parsed(pred_candidates)
    if on_stage:
        on_stage("compare")
    try:
        verdict = equivalent(gold_answer, pred_answer, problem)
    except (MemoryError, RecursionError):
        raise
    except Exception as err:  # SymPy can raise on exotic inputs; a verdict must still come back
        return False, f"error: {type(err).__name__}", gold_used, pred_used
    return verdict.equal, verdict.reason, gold_used, pred_used


def verify_local(
    gold: str,
    pred: str,
    *,
    problem: str | None = None,
    options: VerifierOptions = DEFAULT_OPTIONS,
) -> VerifyResult:
    """Verify in this process without time limits (pure: same input, same output, in any process)."""
    gold_ex, pred_ex = extract_pair(gold, pred, options)
    quick = fast_result(gold_ex, pred_ex, options)
    if quick is not None:
        return quick
    equal, reason, gold_used, pred_used = judge(gold_ex.candidates, pred_ex.candidates, problem)
    return options.result(equal, gold_used, pred_used, reason)


_EXTRACTION_FAILURES = ("no_answer", "empty_box", "unclosed_box")
_PARSE_FAILURES = ("unparsable_pred", "unparsable_gold")


def verifier_metrics(results: list[VerifyResult]) -> dict[str, float]:
    """The C1 "Log" rates over a batch: extraction failures, parse failures, timeouts, and per-reason counts."""
    total = max(1, len(results))
    reasons: dict[str, int] = {}
    for result in results:
        key = "error" if result.reason.startswith("error") else result.reason
        reasons[key] = reasons.get(key, 0) + 1
    metrics = {
        "verifier/accuracy": sum(r.correct for r in results) / total,
        "verifier/extraction_failure_rate": sum(reasons.get(k, 0) for k in _EXTRACTION_FAILURES) / total,
        "verifier/parse_failure_rate": sum(reasons.get(k, 0) for k in _PARSE_FAILURES) / total,
        "verifier/timeout_rate": reasons.get("timeout", 0) / total,
    }
    metrics.update({f"verifier/reason/{reason}": float(count) for reason, count in sorted(reasons.items())})
    return metrics

