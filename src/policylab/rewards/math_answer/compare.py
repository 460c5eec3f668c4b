"""Comparison policy of data_agents_eval.md §C1.3 (normative) on parsed answers.

``equivalent(gold, pred)`` returns a :class:`Verdict` (equal?, reason).  The rules, in the order applied:

* identical normalised strings are equal;
* literals (``204_5``, ``12:00``) only equal the same literal; text answers compare case-insensitively;
* relations: ``x = 3`` ≡ ``3`` when the other side is a value or an assignment to the same variable;
  equations compare by proportional ``lhs − rhs``; a general-equation gold (``2x+z=1``) needs an equation;
  one-variable inequalities compare by solution set, also against intervals, in both directions — unless
  the prediction copies an inequality from the problem text;
* collections: the gold decides — a gold set or list of solutions is matched unordered, a gold tuple
  (point, open pair) ordered; ``±a`` was expanded to a set by the parser;
* scalars: units (reject two different recognised units), angles (degrees → radians against ``π``, when
  the gold has the degree mark or the problem is about angles), percent (``X%`` ≡ ``X``; ``X%`` ≡ ``X/100``
  only when the gold has the ``%`` or the problem says percent), then the number rule:
  exact/symbolic for exact values, 6-decimal rounding only when a decimal literal was written.

Exact values are never accepted by floating evaluation: equality needs SymPy to prove ``a − b = 0``.
High-precision evaluation is used only to *reject* quickly a difference that is clearly non-zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import sympy

from policylab.rewards.math_answer.normalize import normalize_answer
from policylab.rewards.math_answer.numbers import decimal_rule, round_to_places
from policylab.rewards.math_answer.answers import (
    Answer,
    Items,
    Literal,
    MatrixValue,
    Relation,
    Scalar,
    SetValue,
    Text,
    Unparsed,
)
from policylab.rewards.math_answer.parse import as_set, has_decimal, relation_variables, text_key

_EVAL_DIGITS = 50
_CLEARLY_NONZERO = sympy.Float("1e-30")


@dataclass(frozen=True)
class Verdict:
    equal: bool
    reason: str


def _yes(reason: str) -> Verdict:
    return Verdict(True, reason)


def _no(reason: str) -> Verdict:
    return Verdict(False, reason)


# ---------------------------------------------------------------------------------------------------------
# numbers and expressions
# ---------------------------------------------------------------------------------------------------------


def _as_decimal(expr: sympy.Basic) -> Decimal | None:
    """A finite real number as a Decimal with ``_EVAL_DIGITS`` significant digits, else None."""
    if not expr.is_number or expr.has(sympy.oo, -sympy.oo, sympy.zoo):
        return None
    if isinstance(expr, sympy.Rational):
        value = sympy.Float(expr, _EVAL_DIGITS)
    else:
        value = expr.evalf(_EVAL_DIGITS)
    if not value.is_real or not isinstance(value, sympy.Float):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _decimal_equal(gold: sympy.Basic, pred: sympy.Basic) -> str | None:
    """C1.3 decimal-literal rule on two numbers (complex numbers: real and imaginary parts separately)."""
    gold_re, gold_im = gold.as_real_imag()
    pred_re, pred_im = pred.as_real_imag()
    verdicts = []
    for g, p in ((gold_re, pred_re), (gold_im, pred_im)):
        dg, dp = _as_decimal(sympy.nsimplify(g) if g.is_Float else g), _as_decimal(p)
        if dg is None or dp is None:
            return None
        verdict = decimal_rule(dg, dp)
        if verdict is None:
            return None
        verdicts.append(verdict)
    return verdicts[0]


def _exact_equal(a: sympy.Basic, b: sympy.Basic) -> str | None:
    """``exact``/``symbolic`` if SymPy shows ``a == b``; None otherwise (never a float acceptance)."""
    if a == b:
        return "exact"
    if a.has(sympy.oo, -sympy.oo, sympy.zoo) or b.has(sympy.oo, -sympy.oo, sympy.zoo):
        return None
    difference = a - b
    if difference == 0:
        return "exact"
    if difference.is_Rational:
        return None
    if difference.is_number:
        # reject a clearly non-zero difference without simplifying (cheap, and safe: evalf tracks
        # relative precision, so 1/2004! - 1/2006! evaluates to a non-zero number with correct digits)
        try:
            approx = difference.evalf(_EVAL_DIGITS)
            scale = max(abs(a.evalf(_EVAL_DIGITS)), abs(b.evalf(_EVAL_DIGITS)), sympy.Float(1e-300))
            if approx.is_Float and abs(approx) > _CLEARLY_NONZERO * scale:
                return None
        except (TypeError, ValueError):
            pass
    elif _differs_at_sample_points(a, b):
        return None
    if sympy.expand(difference) == 0:
        return "symbolic"
    if sympy.simplify(difference) == 0:
        return "symbolic"
    if difference.is_number and difference.equals(0) is True:
        return "symbolic"
    return None


# Fixed (so the verifier stays a pure function) rational sample points for a quick inequality proof.
_SAMPLE_POINTS = (sympy.Rational(7, 11), sympy.Rational(-13, 17), sympy.Rational(29, 3))


def _differs_at_sample_points(a: sympy.Expr, b: sympy.Expr) -> bool:
    """True if substituting a few fixed rational points proves ``a − b`` is not identically 0.

    A rational difference is exact, so a non-zero one is a proof; otherwise a difference that is clearly
    non-zero relative to the values themselves (50 significant digits) is.  Points where either side is
    undefined are skipped.  Used only to *reject* cheaply before ``simplify``; acceptance always needs a
    symbolic proof.
    """
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    for shift, point in enumerate(_SAMPLE_POINTS):
        values = {symbol: point + sympy.Rational(k, 7 + shift) for k, symbol in enumerate(symbols)}
        try:
            at_a, at_b = a.xreplace(values), b.xreplace(values)
            if any(v.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo) or not v.is_number for v in (at_a, at_b)):
                continue
            difference = at_a - at_b
            if difference.is_Rational:
                if difference != 0:
                    return True
                continue
            gap = abs(difference.evalf(_EVAL_DIGITS))
            scale = max(abs(at_a.evalf(_EVAL_DIGITS)), abs(at_b.evalf(_EVAL_DIGITS)), sympy.Integer(1))
            if gap.is_Float and gap > sympy.Float("1e-20") * scale:
                return True
        except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
            continue
    return False


def values_equal(gold: sympy.Basic, pred: sympy.Basic, decimal: bool) -> str | None:
    """Reason if two SymPy values are equal under C1.3's number rule, else None."""
    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return "exact" if gold == pred else None
    exact = _exact_equal(gold, pred)
    if exact is not None:
        return exact
    if decimal and gold.is_number and pred.is_number:
        return _decimal_equal(gold, pred)
    return None


# C1.3 Percent / Angles: the conversions need the context to say percent / angle (issue 12): otherwise a
# guess written as "28%" would win against both 28 and 0.28, and "45°" against any gold equal to pi/4
_SAYS_PERCENT = re.compile(r"%|\\%|\bper\s?cents?\b|\bpercent(?:age)?s?\b", re.IGNORECASE)
_SAYS_ANGLE = re.compile(
    r"\bangles?\b|\bdegrees?\b|\bradians?\b|\\circ|\\angle|\\measuredangle|\\degree|\u00b0|\u2220|"
    r"\\(?:arc)?(?:sin|cos|tan|cot|sec|csc)(?![a-zA-Z])|\b(?:arc)?(?:sin|cos|tan|cot|sec|csc)\b|\brotat",
    re.IGNORECASE,
)


def says_percent(problem: str | None) -> bool:
    return bool(problem) and bool(_SAYS_PERCENT.search(problem))


def says_angle(problem: str | None) -> bool:
    """An angle context: the problem names angles/degrees/radians/trigonometry; an absent problem (None: the
    hard-case table, the CLI without --problem) leaves a gold in pi free to be an angle (row deg-vs-rad)."""
    return problem is None or bool(_SAYS_ANGLE.search(problem))


def scalars_equal(gold: Scalar, pred: Scalar, problem: str | None = None) -> Verdict:
    """C1.3 scalar rule. Degrees -> radians only when the gold carries the degree mark or the problem is about
    angles (:func:`says_angle`); X% -> X/100 only when the gold carries the percent sign or the problem says
    percent; a bare percent sign against a plain gold is otherwise just dropped (28% = 28, not 0.28)."""
    known = {gold.unit, pred.unit} - {None, "?"}
    if gold.unit not in (None, "?") and pred.unit not in (None, "?") and len(known) == 2:
        return _no("unit_mismatch")
    gold_expr, pred_expr = gold.expr, pred.expr
    tag = ""
    # C1.3 Angles: a degree marker against an expression in pi -> convert degrees to radians
    if gold.degrees and not pred.degrees and pred_expr.has(sympy.pi) and not gold_expr.has(sympy.pi):
        gold_expr, tag = gold_expr * sympy.pi / 180, "degrees_to_radians"
    elif (pred.degrees and not gold.degrees and gold_expr.has(sympy.pi) and not pred_expr.has(sympy.pi)
          and says_angle(problem)):
        pred_expr, tag = pred_expr * sympy.pi / 180, "degrees_to_radians"
    decimal = gold.decimal or pred.decimal
    attempts = [(gold_expr, pred_expr, tag)]
    # C1.3 Percent: scale by 100 only when a % sign is present on exactly one side
    if gold.percent and not pred.percent:
        attempts.append((gold_expr / 100, pred_expr, "percent_scaled"))
    elif pred.percent and not gold.percent and says_percent(problem):
        attempts.append((gold_expr, pred_expr / 100, "percent_scaled"))
    for g, p, why in attempts:
        reason = values_equal(g, p, decimal)
        if reason is not None:
            if gold.percent or pred.percent:
                why = why or "percent"
            return _yes(why or reason)
    return _no("not_equal")


# ---------------------------------------------------------------------------------------------------------
# sets, relations, collections
# ---------------------------------------------------------------------------------------------------------


def _round_number(expr: sympy.Basic) -> sympy.Basic:
    value = _as_decimal(expr) if isinstance(expr, sympy.Expr) else None
    if value is None:
        return expr
    return sympy.Rational(str(round_to_places(value)))


def _round_set(value: sympy.Set) -> sympy.Set:
    if isinstance(value, sympy.Interval):
        return sympy.Interval(_round_number(value.start), _round_number(value.end), value.left_open, value.right_open)
    if isinstance(value, sympy.Union):
        return sympy.Union(*(_round_set(part) for part in value.args))
    if isinstance(value, sympy.FiniteSet):
        return sympy.FiniteSet(*(_round_number(element) for element in value.args))
    return value


def sets_equal(gold: sympy.Set, pred: sympy.Set, decimal: bool) -> bool:
    if decimal:
        gold, pred = _round_set(gold), _round_set(pred)
    if gold == pred:
        return True
    try:
        return sympy.Complement(gold, pred) == sympy.S.EmptySet and sympy.Complement(pred, gold) == sympy.S.EmptySet
    except (TypeError, ValueError, NotImplementedError):
        return False


def _equations_proportional(gold: Relation, pred: Relation) -> bool:
    """``a = b`` ≡ ``c = d`` when ``(a − b)/(c − d)`` simplifies to a non-zero constant."""
    left = gold.sides[0].expr - gold.sides[1].expr
    right = pred.sides[0].expr - pred.sides[1].expr
    if left == 0 or right == 0:
        return left == right
    if left.free_symbols != right.free_symbols:
        return False
    ratio = sympy.simplify(left / right)
    return ratio.is_number and ratio != 0 and ratio.is_finite is not False


def _chain_value(relation: Relation) -> tuple[Scalar | None, str]:
    """The value a relation states, or None and why not.

    ``x = …`` (an assignment, chains included) and an all-numeric chain ``5+5+1 = 11`` state their last
    side — provided the numeric sides of the chain agree with each other (``x = 3 = 4`` states nothing).
    """
    if not relation.is_equation:
        return None, "relation_mismatch"
    if relation.assigned_variable is not None:
        chain = relation.sides[1:]
    elif all(side.expr.is_number for side in relation.sides):
        chain = relation.sides
    else:
        return None, "equation"
    numeric = [side for side in chain if side.expr.is_number]
    for first, second in zip(numeric, numeric[1:]):
        if not scalars_equal(first, second).equal:
            return None, "inconsistent_chain"
    return chain[-1], "assignment"


def _relation_key(text: str) -> str:
    text = normalize_answer(text)
    for long, short in ((r"\leq", r"\le"), (r"\geq", r"\ge"), ("<=", r"\le"), (">=", r"\ge")):
        text = text.replace(long, short)
    return re.sub(r"\s+", "", text)


def copied_from_problem(pred: Relation, problem: str | None) -> bool:
    """C1.3: a predicted inequality that appears verbatim in the problem statement is not an answer."""
    if not problem or not pred.is_inequality:
        return False
    key = _relation_key(pred.source)
    return len(key) >= 3 and key in _relation_key(problem)


def _relations(gold: Answer, pred: Answer, problem: str | None) -> Verdict:
    if isinstance(pred, Relation) and pred.is_inequality and copied_from_problem(pred, problem):
        return _no("copied_from_problem")
    if isinstance(gold, Relation) and isinstance(pred, Relation):
        if gold.is_inequality and pred.is_inequality:
            if relation_variables(gold) != relation_variables(pred):
                return _no("different_variable")
            return _set_verdict(gold, pred)
        if gold.is_equation and pred.is_equation:
            gold_var, pred_var = gold.assigned_variable, pred.assigned_variable
            if gold_var is not None and pred_var is not None:
                if gold_var != pred_var:
                    return _no("different_variable")
                if scalars_equal(gold.sides[-1], pred.sides[-1], problem).equal:
                    return _yes("assignment")
            if len(gold.sides) == 2 and len(pred.sides) == 2 and _equations_proportional(gold, pred):
                return _yes("equation")
            return _no("not_equal")
        return _no("relation_mismatch")
    if isinstance(gold, Relation):
        if gold.is_inequality:
            return _set_verdict(gold, pred)
        value, why = _chain_value(gold)
        if value is None:
            return _no("gold_is_equation" if why == "equation" else why)
        return _named(equivalent(value, pred, problem), "assignment")
    # pred is a relation, gold is not
    if pred.is_inequality:
        return _set_verdict(gold, pred)
    value, why = _chain_value(pred)
    if value is None:
        return _no("pred_is_equation" if why == "equation" else why)
    return _named(equivalent(gold, value, problem), "assignment")


def _named(verdict: Verdict, reason: str) -> Verdict:
    return _yes(reason) if verdict.equal else verdict


def _set_verdict(gold: Answer, pred: Answer) -> Verdict:
    gold_set, pred_set = as_set(gold), as_set(pred)
    if gold_set is None or pred_set is None:
        return _no("type_mismatch")
    return _yes("solution_set") if sets_equal(gold_set, pred_set, has_decimal(gold) or has_decimal(pred)) else _no("not_equal")


def _match_unordered(gold_items: tuple, pred_items: tuple, problem: str | None) -> bool:
    """Is there a one-to-one matching of equivalent items? (backtracking; answer lists are short)"""
    if len(gold_items) != len(pred_items):
        return False
    pairs = [[equivalent(g, p, problem).equal for p in pred_items] for g in gold_items]
    used = [False] * len(pred_items)

    def assign(i: int) -> bool:
        if i == len(gold_items):
            return True
        for j, ok in enumerate(pairs[i]):
            if ok and not used[j]:
                used[j] = True
                if assign(i + 1):
                    return True
                used[j] = False
        return False

    return assign(0)


def _collections(gold: Answer, pred: Answer, problem: str | None) -> Verdict:
    if isinstance(gold, SetValue) or isinstance(pred, SetValue):
        return _set_verdict(gold, pred)
    if isinstance(gold, Items) and isinstance(pred, Items):
        # C1.3 Sets vs lists: the gold decides — a tuple/point is ordered, a set or list of solutions is not
        if gold.kind == "tuple":
            if pred.kind == "set":
                return _no("type_mismatch")
            if len(gold.items) != len(pred.items):
                return _no("length_mismatch")
            ok = all(equivalent(g, p, problem).equal for g, p in zip(gold.items, pred.items))
            return _yes("ordered") if ok else _no("not_equal")
        if len(gold.items) != len(pred.items):
            return _no("length_mismatch")
        return _yes("unordered") if _match_unordered(gold.items, pred.items, problem) else _no("not_equal")
    collection, single = (gold, pred) if isinstance(gold, Items) else (pred, gold)
    if len(collection.items) == 1:
        inner = collection.items[0]
        return equivalent(inner, single, problem) if collection is gold else equivalent(gold, inner, problem)
    return _no("length_mismatch")


def _matrices(gold: Answer, pred: Answer, problem: str | None = None) -> Verdict:
    def rows_of(answer):
        if isinstance(answer, MatrixValue):
            return answer.rows
        if isinstance(answer, Items) and answer.kind == "tuple" and all(isinstance(i, Scalar) for i in answer.items):
            return None, answer.items  # a vector, matched against a single row or column
        return None

    gold_rows, pred_rows = rows_of(gold), rows_of(pred)
    if gold_rows is None or pred_rows is None:
        return _no("type_mismatch")
    if isinstance(gold_rows, tuple) and gold_rows and gold_rows[0] is None:
        gold_rows, pred_rows = pred_rows, gold_rows
        swapped = True
    else:
        swapped = False
    if pred_rows and pred_rows[0] is None:  # vector vs matrix: compare with the flattened row/column
        vector = pred_rows[1]
        flat = [cell for row in gold_rows for cell in row]
        if not (len(gold_rows) == 1 or all(len(row) == 1 for row in gold_rows)) or len(flat) != len(vector):
            return _no("shape_mismatch")
        pairs = zip(vector, flat) if swapped else zip(flat, vector)
        return _yes("matrix") if all(scalars_equal(g, p, problem).equal for g, p in pairs) else _no("not_equal")
    if len(gold_rows) != len(pred_rows) or any(len(a) != len(b) for a, b in zip(gold_rows, pred_rows)):
        return _no("shape_mismatch")
    ok = all(scalars_equal(g, p, problem).equal for grow, prow in zip(gold_rows, pred_rows) for g, p in zip(grow, prow))
    return _yes("matrix") if ok else _no("not_equal")


def equivalent(gold: Answer, pred: Answer, problem: str | None = None) -> Verdict:
    """C1.3 verdict for a parsed gold answer and a parsed prediction."""
    if isinstance(pred, Unparsed) or isinstance(gold, Unparsed):
        if re.sub(r"\s+", "", gold.source) == re.sub(r"\s+", "", pred.source) and gold.source.strip():
            return _yes("identical")
        if isinstance(pred, Unparsed) and isinstance(gold, Text) and text_key(pred.source) == gold.text:
            return _yes("text")
        return _no("unparsable_gold" if isinstance(gold, Unparsed) else "unparsable_pred")
    if isinstance(gold, Literal) or isinstance(pred, Literal):
        if isinstance(gold, Literal) and isinstance(pred, Literal) and (gold.kind, gold.text) == (pred.kind, pred.text):
            return _yes("literal")
        return _no("literal_mismatch")
    if isinstance(gold, Text) or isinstance(pred, Text):
        gold_key = gold.text if isinstance(gold, Text) else text_key(gold.source)
        pred_key = pred.text if isinstance(pred, Text) else text_key(pred.source)
        return _yes("text") if gold_key == pred_key and gold_key else _no("text_mismatch")
    if isinstance(gold, MatrixValue) or isinstance(pred, MatrixValue):
        return _matrices(gold, pred, problem)
    if isinstance(gold, Relation) or isinstance(pred, Relation):
        # a one-element collection around a relation is the relation itself
        if isinstance(gold, Items) and len(gold.items) == 1:
            return equivalent(gold.items[0], pred, problem)
        if isinstance(pred, Items) and len(pred.items) == 1:
            return equivalent(gold, pred.items[0], problem)
        return _relations(gold, pred, problem)
    if isinstance(gold, (Items, SetValue)) or isinstance(pred, (Items, SetValue)):
        return _collections(gold, pred, problem)
    return scalars_equal(gold, pred, problem)
