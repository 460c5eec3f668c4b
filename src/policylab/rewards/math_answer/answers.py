"""Typed answers produced by :mod:`.parse` and compared by :mod:`.compare` (data_agents_eval.md §C1.1 step 3).

Every answer keeps ``source``, its normalised string, for the text fallback and the copy check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import sympy


@dataclass(frozen=True)
class Scalar:
    """One value or expression, with the annotations C1.3 compares separately."""

    expr: sympy.Basic
    source: str
    decimal: bool = False
    percent: bool = False
    degrees: bool = False
    unit: str | None = None


@dataclass(frozen=True)
class Text:
    """A word answer (a name, yes/no, a multiple-choice letter); compared case-insensitively."""

    text: str
    source: str


@dataclass(frozen=True)
class Literal:
    """A numeral that must be matched as written: ``204_5`` (base 5), ``12:00`` (clock time)."""

    text: str
    kind: str
    source: str


@dataclass(frozen=True)
class Items:
    """A list (top-level commas), a set (``\\{…\\}``, ``±``) or a tuple (``(…, …)``)."""

    kind: str  # "list" | "set" | "tuple"
    items: tuple
    source: str


@dataclass(frozen=True)
class SetValue:
    """An interval or a union of intervals/sets, as a SymPy set with the endpoints' decimal flag."""

    value: sympy.Set
    decimal: bool
    source: str


@dataclass(frozen=True)
class Relation:
    """A chain ``a op b op c``: ops from ``= < > \\le \\ge \\ne``."""

    ops: tuple
    sides: tuple  # Scalars
    source: str

    @property
    def is_equation(self) -> bool:
        return all(op == "=" for op in self.ops)

    @property
    def is_inequality(self) -> bool:
        return all(op != "=" for op in self.ops)

    @property
    def assigned_variable(self) -> str | None:
        """``"x"`` for ``x = …`` (chains included), ``"f(x)"`` for ``f(x) = …``: the left side names one thing."""
        left = self.sides[0].expr
        if self.is_equation and isinstance(left, (sympy.Symbol, sympy.core.function.AppliedUndef)):
            return str(left)
        return None


@dataclass(frozen=True)
class MatrixValue:
    rows: tuple  # tuple of tuples of Scalars
    source: str


@dataclass(frozen=True)
class Unparsed:
    source: str


Answer = Union[Scalar, Text, Literal, Items, SetValue, Relation, MatrixValue, Unparsed]
