"""Turning assert-style tests into child probes plus parent-side checks (issue 4 part 2).

A solution runs in the same interpreter as anything the child does on its behalf, so no secret kept
in the child (a nonce, a "PASS" marker, the comparison function) is safe from it. The expected
values therefore never enter the child. Each top-level ``assert EXPR`` is split:

* sub-expressions that need the solution (calls to its functions, attribute access, subscripts,
  comprehensions, names it defines) become *probes*: evaluated in the child, their values sent back
  as plain data (exact builtin types only; an object with a forged ``__eq__`` cannot be encoded);
* the rest (literals, comparisons, boolean logic, arithmetic, and a whitelist of pure builtins such as
  ``sorted``, ``len``, ``abs``, ``math.isclose``) is evaluated here, in the parent, on those values.

So ``assert f(3) == 12`` sends only ``f(3)``; the 12 stays here. A solution can pass a test only by
producing the right value. Remaining in-child trust: a call to the whitelist that takes a generator
or lambda (``all(f(i) == i for i in ...)``) is probed whole, so its comparisons run in the child.

Non-assert statements of a test (``x = f(2)``) run in the child, in order with the probes.
"""

from __future__ import annotations

import ast
import builtins
import math
import operator
from dataclasses import dataclass
from types import SimpleNamespace

_SAFE_FUNCTIONS = ("abs", "all", "any", "bool", "complex", "dict", "divmod", "float", "frozenset", "int",
                   "isinstance", "len", "list", "max", "min", "repr", "round", "set", "sorted", "str", "sum",
                   "tuple", "type", "bytes")
_SAFE_MATH = ("isclose", "inf", "nan", "pi", "e", "tau", "sqrt", "fabs", "floor", "ceil", "isnan", "isinf",
              "isfinite", "log", "log2", "log10", "exp", "gcd", "comb", "factorial", "prod", "fsum", "trunc")
_OPAQUE_ARGS = (ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp, ast.Lambda)
_MAX_SEQUENCE = 10_000_000  # elements a parent-side repetition may create
_MAX_POW_BITS = 100_000
PROBE_PREFIX = "__probe_"


@dataclass(frozen=True)
class CompiledTest:
    """One test string, split. ``steps`` go to the child: ("exec", statements) or ("probe", expr).
    ``checks`` are this side's expressions, one per assert, over names ``__probe_<k>``."""

    source: str
    steps: tuple[tuple[str, str], ...]
    checks: tuple[object, ...]  # code objects
    num_probes: int


class _Splitter(ast.NodeTransformer):
    """Replace every sub-expression the parent cannot evaluate by a probe name."""

    def __init__(self, first_probe: int):
        self.probes: list[str] = []
        self.first_probe = first_probe

    def probe(self, node: ast.expr) -> ast.Name:
        name = f"{PROBE_PREFIX}{self.first_probe + len(self.probes)}"
        self.probes.append(ast.unparse(node))
        return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)

    def visit(self, node):
        if not isinstance(node, (ast.expr, ast.keyword)):  # operators and contexts: nothing to evaluate
            return node
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, ast.Name):
            return node if node.id in _SAFE_FUNCTIONS else self.probe(node)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict, ast.Starred, ast.Compare, ast.BoolOp,
                             ast.UnaryOp, ast.IfExp, ast.keyword)):
            return self.generic_visit(node)
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            call = ast.Call(func=ast.Name(id="__binop", ctx=ast.Load()),
                            args=[ast.Constant(type(node.op).__name__), left, right], keywords=[])
            return ast.copy_location(call, node)
        if isinstance(node, ast.Attribute) and _is_math(node):
            return node
        if isinstance(node, ast.Call) and _is_safe_callee(node.func):
            arguments = [*node.args, *(k.value for k in node.keywords)]
            if any(isinstance(a, _OPAQUE_ARGS) for a in arguments):
                return self.probe(node)
            return self.generic_visit(node)
        return self.probe(node)


def _is_math(node) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math"
            and node.attr in _SAFE_MATH)


def _is_safe_callee(func) -> bool:
    return (isinstance(func, ast.Name) and func.id in _SAFE_FUNCTIONS) or _is_math(func)


def compile_test(source: str, index: int = 0) -> CompiledTest:
    """Split one test string; raises ValueError naming the test if it is not usable."""
    if not isinstance(source, str):
        raise ValueError(f"test #{index} must be a string, got {type(source).__name__}")
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"test #{index} is not valid Python: {err.msg} ({source[:80]!r})") from err
    steps: list[tuple[str, str]] = []
    checks = []
    num_probes = 0
    for statement in tree.body:
        if not isinstance(statement, ast.Assert):
            steps.append(("exec", ast.unparse(statement)))
            continue
        splitter = _Splitter(num_probes)
        expression = ast.Expression(body=splitter.visit(statement.test))
        ast.fix_missing_locations(expression)
        checks.append(compile(expression, f"<test {index} check>", "eval"))
        steps.extend(("probe", p) for p in splitter.probes)
        num_probes += len(splitter.probes)
    if not checks:
        raise ValueError(f"test #{index} has no top-level assert statement: {source[:80]!r}")
    return CompiledTest(source, tuple(steps), tuple(checks), num_probes)


# --------------------------------------------------------------------------------------------------
# Parent-side evaluation
# --------------------------------------------------------------------------------------------------
def _bounded_binop(op_name: str, left, right):
    """Arithmetic on decoded plain data, refusing operations whose cost the child could blow up
    (``2 ** huge``, ``[0] * huge``, ``1 << huge``)."""
    op = _BINOPS.get(op_name)
    if op is None:
        raise TypeError(f"operator {op_name} is not supported in a test check")
    if op_name == "Pow" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if max(abs(left), 2).bit_length() * right > _MAX_POW_BITS:
            raise OverflowError("power too large for a test check")
    if op_name == "LShift" and isinstance(right, int) and right > _MAX_POW_BITS:
        raise OverflowError("shift too large for a test check")
    if op_name == "Mult":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
                if len(seq) * count > _MAX_SEQUENCE:
                    raise OverflowError("repetition too large for a test check")
    return op(left, right)


_BINOPS = {"Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "Div": operator.truediv,
           "FloorDiv": operator.floordiv, "Mod": operator.mod, "Pow": operator.pow, "LShift": operator.lshift,
           "RShift": operator.rshift, "BitOr": operator.or_, "BitXor": operator.xor, "BitAnd": operator.and_}
_CHECK_GLOBALS = {
    "__builtins__": {name: getattr(builtins, name) for name in _SAFE_FUNCTIONS},
    "math": SimpleNamespace(**{name: getattr(math, name) for name in _SAFE_MATH}),
    "__binop": _bounded_binop,
}


def evaluate_check(check, probe_values: dict[str, object]) -> bool:
    """Truth of one assert, given the probes' decoded values (any exception counts as failure)."""
    return bool(eval(check, dict(_CHECK_GLOBALS), dict(probe_values)))


def decode_value(encoded, _depth: int = 0):
    """Inverse of ``_child.encode_value``; raises ValueError on anything malformed (a program may
    write into the result pipe, so records are validated, never trusted)."""
    if _depth > 100 or not isinstance(encoded, list) or not encoded or not isinstance(encoded[0], str):
        raise ValueError("malformed probe value")
    tag, rest = encoded[0], encoded[1:]
    sub = lambda items: [decode_value(v, _depth + 1) for v in _items(items)]  # noqa: E731
    if tag == "n" and not rest:
        return None
    if tag == "b" and len(rest) == 1 and isinstance(rest[0], bool):
        return rest[0]
    if tag == "i" and len(rest) == 1 and isinstance(rest[0], str):
        return int(rest[0])
    if tag == "f" and len(rest) == 1 and isinstance(rest[0], str):
        return float(rest[0])
    if tag == "c" and len(rest) == 2 and all(isinstance(x, str) for x in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "s" and len(rest) == 1 and isinstance(rest[0], str):
        return rest[0]
    if tag == "y" and len(rest) == 1 and isinstance(rest[0], str):
        return bytes.fromhex(rest[0])
    if len(rest) == 1:
        if tag == "l":
            return sub(rest[0])
        if tag == "t":
            return tuple(sub(rest[0]))
        if tag == "S":
            return set(sub(rest[0]))
        if tag == "F":
            return frozenset(sub(rest[0]))
        if tag == "d":
            pairs = [_items(p) for p in _items(rest[0])]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("malformed dict in probe value")
            return {decode_value(k, _depth + 1): decode_value(v, _depth + 1) for k, v in pairs}
    raise ValueError(f"malformed probe value with tag {tag!r}")


def _items(value) -> list:
    if not isinstance(value, list):
        raise ValueError("malformed probe value")
    return value


# --------------------------------------------------------------------------------------------------
# stdin/stdout comparison
# --------------------------------------------------------------------------------------------------
COMPARE_MODES = ("lines", "tokens", "exact")


def outputs_match(got: str, expected: str, mode: str = "lines") -> bool:
    """``lines``: equal after stripping trailing whitespace of each line and trailing blank lines;
    ``tokens``: equal whitespace-separated tokens; ``exact``: byte-for-byte."""
    if mode == "exact":
        return got == expected
    if mode == "tokens":
        return got.split() == expected.split()
    if mode == "lines":
        return _lines(got) == _lines(expected)
    raise ValueError(f"compare mode must be one of {COMPARE_MODES}, got {mode!r}")


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines
