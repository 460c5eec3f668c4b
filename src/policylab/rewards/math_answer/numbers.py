"""The C1.3 number rule shared by the SymPy comparator and the in-process fast path (no SymPy here).

data_agents_eval.md §C1.3, Numbers: exact values are compared exactly; only when either side was written
as a decimal literal do we accept values that agree after rounding both to ``ROUND_DECIMALS`` places — and
when ``|gold| < SMALL_GOLD`` a relative tolerance ``REL_TOL`` replaces the absolute rounding, so tiny
answers are not all rounded to 0.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from fractions import Fraction

ROUND_DECIMALS = 6
REL_TOL = Decimal("1e-6")
SMALL_GOLD = Decimal("1e-3")
_QUANTUM = Decimal(1).scaleb(-ROUND_DECIMALS)


def fraction_to_decimal(value: Fraction, digits: int = 60) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = digits
        return Decimal(value.numerator) / Decimal(value.denominator)


def round_to_places(value: Decimal) -> Decimal:
    """``value`` rounded half-up to ``ROUND_DECIMALS`` decimal places (exact, any magnitude)."""
    with localcontext() as ctx:
        ctx.prec = max(60, value.adjusted() + ROUND_DECIMALS + 10)
        try:
            return value.quantize(_QUANTUM, rounding=ROUND_HALF_UP)
        except InvalidOperation:  # astronomically large: rounding to 6 places cannot change equality
            return value


def decimal_rule(gold: Decimal, pred: Decimal) -> str | None:
    """Reason string if the two values agree under the decimal-literal rule, else None."""
    if abs(gold) < SMALL_GOLD:
        return "relative_tolerance" if abs(gold - pred) <= REL_TOL * abs(gold) else None
    return "rounded_6dp" if round_to_places(gold) == round_to_places(pred) else None
