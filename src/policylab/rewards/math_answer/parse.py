"""Parsing a normalised answer into a typed answer object (data_agents_eval.md §C1.1 step 3).

The *structure* of an answer (list, set, tuple, interval, union, relation chain, matrix, text, base-n or
clock literal) is recognised here by our own bracket-aware splitter, so the C1.3 rules about order,
openness and assignments are ours; each scalar piece is converted to SymPy by ``latex2sympy2_extended``
(the parser behind Math-Verify) with its own normaliser switched off — ours ran already.

Decimal literals are rewritten as exact fractions before SymPy sees them, so every value is exact and the
``decimal`` flag alone decides whether C1.3's 6-decimal rounding applies.
"""

from __future__ import annotations

import re
from decimal import Decimal

import sympy
from latex2sympy2_extended import latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig

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
from policylab.rewards.math_answer.normalize import (
    exact_decimals,
    normalize_answer,
    read_mixed_numbers,
    split_scalar_markers,
)

_CONVERSION = ConversionConfig(
    interpret_as_mixed_fractions=False,  # our normaliser reads "1\frac12" as a mixed number explicitly
    interpret_simple_eq_as_assignment=False,
    interpret_contains_as_eq=False,
    lowercase_symbols=False,  # x and X are different variables; text answers are compared case-insensitively
)
MAX_SCALAR_CHARS = 2000
# a plain decimal or integer literal is read exactly without the LaTeX parser, so it may be longer than
# MAX_SCALAR_CHARS (a box holds at most extract.MAX_BOX_CHARS); Decimal -> ratio is quasi-linear and is not
# subject to Python's int-from-str digit limit
MAX_LITERAL_CHARS = 100_000
_PLAIN_LITERAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


class ParseError(ValueError):
    """The string is not an answer we can read."""


# ---------------------------------------------------------------------------------------------------------
# bracket-aware splitting
# ---------------------------------------------------------------------------------------------------------

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = set(")]}")


def _tokens_depth(text: str):
    """Yield (index, char, depth_before) with ``\\{``/``\\}`` counted as brackets and other escapes skipped."""
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt in "{}":
                if nxt == "{":
                    yield i, "\\{", depth
                    depth += 1
                else:
                    depth -= 1
                    yield i, "\\}", depth
                i += 2
                continue
            yield i, "\\", depth
            i += 2 if nxt == "\\" else 1  # "\\\\" (a row break) must not escape what follows
            continue
        if ch in "([{":
            yield i, ch, depth
            depth += 1
        elif ch in ")]}":
            depth -= 1
            yield i, ch, depth
        else:
            yield i, ch, depth
        i += 1


def split_top_level(text: str, separators: str = ",;") -> list[str]:
    """Split at separators that sit outside every bracket."""
    parts, start = [], 0
    for i, ch, depth in _tokens_depth(text):
        if depth == 0 and ch in separators:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _wrapping_bracket(text: str) -> tuple[str, str] | None:
    """``("(", ")")`` etc. if one bracket pair wraps the whole text (interval brackets may differ)."""
    text = text.strip()
    if len(text) < 2:
        return None
    if text.startswith(r"\{") and text.endswith(r"\}"):
        opener, closer = r"\{", r"\}"
    elif text.startswith(r"\langle") and text.endswith(r"\rangle"):
        return (r"\langle", r"\rangle") if _balanced_inside(text[7:-7]) else None
    elif text[0] in "([" and text[-1] in ")]":
        opener, closer = text[0], text[-1]
    else:
        return None
    # the opening bracket must close at the very end
    for i, ch, depth in _tokens_depth(text):
        if depth == 0 and i not in (0,) and ch in (")", "]", "\\}") and i < len(text) - len(closer):
            return None
    return opener, closer


def _balanced_inside(text: str) -> bool:
    return all(depth >= 0 for _, _, depth in _tokens_depth(text))


_RELATION = re.compile(
    r"\\(?:leqslant|geqslant|leq|geq|neq|le|ge|ne|lt|gt|approx)(?![a-zA-Z])|<=|>=|!=|=|<|>"
)
_RELATION_CANON = {
    r"\le": "<=", r"\leq": "<=", r"\leqslant": "<=", "<=": "<=",
    r"\ge": ">=", r"\geq": ">=", r"\geqslant": ">=", ">=": ">=",
    r"\ne": "!=", r"\neq": "!=", "!=": "!=",
    r"\lt": "<", "<": "<", r"\gt": ">", ">": ">",
    "=": "=", r"\approx": "=",
}


def _split_relation(text: str) -> tuple[list[str], list[str]]:
    """Sides and canonical operators of a top-level relation chain (one side and no op if none)."""
    depth_at = {}
    for i, _, depth in _tokens_depth(text):
        depth_at[i] = depth
    sides, ops, start = [], [], 0
    for match in _RELATION.finditer(text):
        if depth_at.get(match.start(), 0) != 0:
            continue
        sides.append(text[start : match.start()])
        ops.append(_RELATION_CANON[match.group(0)])
        start = match.end()
    sides.append(text[start:])
    return sides, ops


# ---------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------

_BASE_LITERAL = re.compile(r"^(\d[0-9A-Fa-f]*)_\{?(\d+)\}?$")
_CLOCK_LITERAL = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(am|pm|a\.m\.|p\.m\.)?$", re.IGNORECASE)
_TEXT_WHOLE = re.compile(r"^\\text\{([^{}]*)\}$")
_CHOICE = re.compile(r"^\(?\s*([A-Za-z])\s*\)$|^\(\s*([A-Za-z])\s*\)?$")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z' \-]*[A-Za-z]$")
_MATH_WORDS = {"pi", "infty", "sin", "cos", "tan", "log", "ln", "exp", "sqrt"}
_NUMERIC_TEXT = re.compile(r"^[\s\d.,+\-/]+$")
# "1 2" (two numbers side by side) is ambiguous; "\log_2 3" or "x^2 3" is not (the first is an index)
_AMBIGUOUS_DIGITS = re.compile(r"(?<![\w^_.])\d+\s+\d")


def text_key(text: str) -> str:
    """Canonical form for text comparison: ``\\text{}`` unwrapped, lower case, no spaces, ``(C)`` -> ``c``."""
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.replace("{", "").replace("}", "").replace("\\", "")
    text = re.sub(r"\s+", "", text).lower().strip(".,;:")
    match = re.fullmatch(r"\(?([a-z])\)?", text)
    return match.group(1) if match else text


def parse_answer(raw: str) -> Answer:
    """Normalise and parse one extracted answer string. Raises nothing: failures give :class:`Unparsed`."""
    text = normalize_answer(raw)
    if not text:
        return Unparsed(raw)
    try:
        return _parse_structure(text)
    except (ParseError, RecursionError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            NotImplementedError, ZeroDivisionError, sympy.SympifyError):
        return Unparsed(text)
    except Exception:  # the antlr-based parser raises bare Exception on syntax errors
        return Unparsed(text)


def _parse_structure(text: str) -> Answer:
    text = text.strip()
    if not text:
        raise ParseError("empty answer")

    # "\pm a" / "b \pm a": the set {b + a, b - a} (C1.3 Sets)
    for sign in (r"\pm", r"\mp"):
        if text.count(sign) == 1 and "," not in text:
            plus, minus = text.replace(sign, "+"), text.replace(sign, "-")
            return Items("set", (_parse_structure(plus), _parse_structure(minus)), text)

    if r"\begin{" in text and "matrix" in text:
        return _parse_matrix(text)

    # a union of intervals/sets
    union_parts = _split_on_command(text, r"\cup")
    if len(union_parts) > 1:
        pieces = [_parse_structure(part) for part in union_parts]
        sets = [_as_set(piece) for piece in pieces]
        if any(s is None for s in sets):
            raise ParseError("a \\cup part is not a set or interval")
        decimal = any(_has_decimal(piece) for piece in pieces)
        return SetValue(sympy.Union(*sets), decimal, text)

    if text == r"\emptyset":
        return SetValue(sympy.S.EmptySet, False, text)

    wrapped = _wrapping_bracket(text)
    if wrapped is not None:
        opener, closer = wrapped
        inner = text[len(opener) : len(text) - len(closer)]
        elements = split_top_level(inner)
        if opener == r"\{":
            return Items("set", tuple(_parse_structure(e) for e in elements if e.strip()), text)
        if len(elements) >= 2:
            if len(elements) == 2 and (opener == "[" or closer == "]") and opener in "([" and closer in ")]":
                return _parse_interval(elements, opener == "(", closer == ")", text)
            return Items("tuple", tuple(_parse_structure(e) for e in elements), text)

    elements = split_top_level(text)
    if len(elements) > 1:
        elements = [e for e in elements if e.strip()]
        if len(elements) == 1:
            return _parse_structure(elements[0])
        return Items("list", tuple(_parse_structure(e) for e in elements), text)

    sides, ops = _split_relation(text)
    if ops:
        if any(not side.strip() for side in sides):
            raise ParseError("relation with an empty side")
        parsed_sides = tuple(_parse_scalar(side) for side in sides)
        if not all(isinstance(side, Scalar) for side in parsed_sides):
            raise ParseError("a side of the relation is not a mathematical value")
        return Relation(tuple(ops), parsed_sides, text)

    return _parse_leaf(text)


def _split_on_command(text: str, command: str) -> list[str]:
    if command not in text:
        return [text]
    depth_at = {i: depth for i, _, depth in _tokens_depth(text)}
    parts, start = [], 0
    for match in re.finditer(re.escape(command) + r"(?![a-zA-Z])", text):
        if depth_at.get(match.start(), 0) == 0:
            parts.append(text[start : match.start()])
            start = match.end()
    parts.append(text[start:])
    return [p for p in parts if p.strip()] if len(parts) > 1 else parts


def _parse_leaf(text: str) -> Answer:
    """A single non-structured answer: literal, text, or scalar value."""
    stripped = text.strip()
    match = _BASE_LITERAL.match(stripped)
    if match and 2 <= int(match.group(2)) <= 36 and int(match.group(2)) != 10 and _valid_digits(match.group(1), int(match.group(2))):
        digits = match.group(1).upper().lstrip("0") or "0"
        return Literal(f"{digits}_{int(match.group(2))}", "base", text)
    match = _CLOCK_LITERAL.match(stripped)
    if match:
        hour, minute, second, half = match.groups()
        key = f"{int(hour)}:{minute}" + (f":{second}" if second else "")
        if half:
            key += " " + half.replace(".", "").lower()
        return Literal(key, "clock", text)
    return _parse_scalar(text)


def _valid_digits(digits: str, base: int) -> bool:
    """Every digit is below the base (``204_5`` is a base-5 numeral; ``a_2`` is a subscripted variable)."""
    return all(int(digit, 36) < base for digit in digits)


def _text_answer(inner: str, source: str) -> Text:
    return Text(text_key(inner), source)


def _plain_literal(text: str) -> Scalar | None:
    """A decimal/integer literal of any length up to MAX_LITERAL_CHARS as an exact Rational, else None."""
    if len(text) > MAX_LITERAL_CHARS or not _PLAIN_LITERAL.fullmatch(text):
        return None
    numerator, denominator = Decimal(text).as_integer_ratio()
    return Scalar(sympy.Rational(numerator, denominator), text, "." in text)


def _parse_scalar(text: str) -> Answer:
    text = text.strip()
    literal = _plain_literal(text) if len(text) > MAX_SCALAR_CHARS else None
    if literal is not None:
        return literal
    if len(text) > MAX_SCALAR_CHARS:
        raise ParseError("answer too long")
    whole_text = _TEXT_WHOLE.match(text)
    if whole_text:
        inner = whole_text.group(1).strip()
        if _NUMERIC_TEXT.match(inner):
            text = inner  # C1.3: numbers inside \text{} are numbers
        elif re.match(r"^[-+]?\.?\d", inner):  # "\text{5 cm}": a number with its unit
            try:
                return _parse_scalar(inner)
            except Exception:
                return _text_answer(inner, text)
        else:
            return _text_answer(inner, text)
    choice = _CHOICE.match(text)
    if choice:
        return _text_answer(choice.group(1) or choice.group(2), text)
    if _WORDS.match(text) and text.lower() not in _MATH_WORDS and len(text.replace(" ", "")) >= 3:
        return _text_answer(text, text)

    markers = split_scalar_markers(text)
    body = markers.body
    if not body:
        raise ParseError("nothing left after removing units")
    if _TEXT_WHOLE.match(body):
        inner = _TEXT_WHOLE.match(body).group(1).strip()
        if not _NUMERIC_TEXT.match(inner):
            return _text_answer(inner, text)
        body = inner
    body = read_mixed_numbers(body)
    body, decimal = exact_decimals(body)
    if _AMBIGUOUS_DIGITS.search(re.sub(r"\\[a-zA-Z]+", " x ", body)):
        raise ParseError("digits separated by a space are ambiguous")
    expr = _to_sympy(body)
    if isinstance(expr, (sympy.Set, sympy.Tuple)) or not isinstance(expr, sympy.Basic):
        raise ParseError("scalar parsed into a collection")
    if expr.has(sympy.zoo) or expr.has(sympy.nan):
        raise ParseError("undefined value")
    if isinstance(expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction,
                         sympy.logic.boolalg.BooleanAtom)):
        raise ParseError("relation where a value was expected")
    return Scalar(expr, text, decimal, markers.percent, markers.degrees, markers.unit)


def _to_sympy(latex: str) -> sympy.Basic:
    expr = latex2sympy(latex, normalization_config=None, conversion_config=_CONVERSION)
    if isinstance(expr, sympy.MatrixBase):
        raise ParseError("matrix where a value was expected")
    floats = expr.atoms(sympy.Float) if isinstance(expr, sympy.Basic) else set()
    if floats:  # a float that slipped past exact_decimals: keep its written digits exactly
        expr = expr.xreplace({f: sympy.Rational(str(f)) for f in floats})
    if isinstance(expr, sympy.Basic) and not isinstance(expr, (sympy.Set,)):
        # in a final answer a free "i" is the imaginary unit (C1.2: complex markers), not a variable
        imaginary = {symbol: sympy.I for symbol in expr.free_symbols if getattr(symbol, "name", "") == "i"}
        if imaginary:
            expr = expr.xreplace(imaginary)
        expr = expr.doit()
    return expr


def _parse_interval(elements: list[str], left_open: bool, right_open: bool, source: str) -> SetValue:
    low, high = (_parse_scalar(e) for e in elements)
    if not isinstance(low, Scalar) or not isinstance(high, Scalar):
        raise ParseError("interval endpoint is not a value")
    interval = sympy.Interval(low.expr, high.expr, left_open, right_open)
    return SetValue(interval, low.decimal or high.decimal, source)


def _parse_matrix(text: str) -> MatrixValue:
    body, decimal = exact_decimals(text)
    matrix = latex2sympy(body, normalization_config=None, conversion_config=_CONVERSION)
    if not isinstance(matrix, sympy.MatrixBase):
        raise ParseError("matrix environment did not parse to a matrix")
    rows = tuple(
        tuple(Scalar(sympy.sympify(matrix[r, c]).doit(), str(matrix[r, c]), decimal) for c in range(matrix.cols))
        for r in range(matrix.rows)
    )
    return MatrixValue(rows, text)


def _has_decimal(answer: Answer) -> bool:
    if isinstance(answer, (Scalar, SetValue)):
        return answer.decimal
    if isinstance(answer, Items):
        return any(_has_decimal(item) for item in answer.items)
    if isinstance(answer, Relation):
        return any(side.decimal for side in answer.sides)
    return False


def _as_set(answer: Answer) -> sympy.Set | None:
    """An answer read as a set of reals, when that reading exists (interval, open pair, inequality...)."""
    if isinstance(answer, SetValue):
        return answer.value
    if isinstance(answer, Items) and answer.kind == "tuple" and len(answer.items) == 2:
        low, high = answer.items
        if isinstance(low, Scalar) and isinstance(high, Scalar):
            return sympy.Interval(low.expr, high.expr, True, True)
    if isinstance(answer, Items) and answer.kind in ("set", "list"):
        if all(isinstance(item, Scalar) for item in answer.items):
            return sympy.FiniteSet(*(item.expr for item in answer.items))
    if isinstance(answer, Scalar) and answer.expr.is_number:
        return sympy.FiniteSet(answer.expr)
    if isinstance(answer, Relation) and answer.is_inequality:
        return inequality_solution_set(answer)
    return None


def inequality_solution_set(relation: Relation) -> sympy.Set | None:
    """Solution set over the reals of a one-variable inequality chain (``1 < x \\le 2``)."""
    symbols = set()
    for side in relation.sides:
        symbols |= side.expr.free_symbols
    if len(symbols) != 1:
        return None
    (symbol,) = symbols
    real = sympy.Symbol(symbol.name, real=True)
    sides = [side.expr.xreplace({symbol: real}) for side in relation.sides]
    makers = {"<": sympy.Lt, ">": sympy.Gt, "<=": sympy.Le, ">=": sympy.Ge, "!=": sympy.Ne}
    conditions = [makers[op](left, right) for op, left, right in zip(relation.ops, sides, sides[1:])]
    solution = sympy.S.Reals
    for condition in conditions:
        solution = solution.intersect(condition.as_set())
    return solution


def relation_variables(relation: Relation) -> set:
    names = set()
    for side in relation.sides:
        names |= {s.name for s in side.expr.free_symbols}
    return names


# exported for the comparator
as_set = _as_set
has_decimal = _has_decimal
