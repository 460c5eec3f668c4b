"""Type validation of component parameters at recipe load (design.md §Contracts).

:func:`registry.check_params` checks parameter *names*; :func:`validate_params` then checks their
*values* against the component's signature, so ``eps_high: abc`` fails when the recipe loads (naming
component, parameter, recipe location, expected type and value) instead of as a raw TypeError after the
model loaded. A pydantic model is built once per component from its signature:

- an annotated parameter takes its annotation (string annotations from ``from __future__ import
  annotations`` are resolved with ``typing.get_type_hints``; one that cannot be resolved is ``Any``);
  a ``None`` default also admits ``None``;
- an unannotated parameter takes the type of its default when that is a bool, int, float or str (an int
  default accepts whole numbers only, a float default ints or floats), ``Any`` otherwise.

Validation is pydantic's lax mode: a YAML string holding a number ("5e-4") becomes the float the user
meant, while ``abc`` or a list for a float, ``0.5`` for an int, or ``maybe`` for a bool are errors.
Required parameters (no default) missing from the recipe are reported, except the model parameters an
optimizer class receives from the trainer (see :data:`SUPPLIED_BY_CODE`).

This module imports :mod:`policylab.registry`; the registry imports it lazily (no import cycle).
"""

from __future__ import annotations

import collections.abc
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from policylab import registry

# Leading __init__ arguments that code, not the recipe, passes: the trainer builds an optimizer as
# ``cls(model_parameters, **recipe_params)``. Such parameters are never reported as missing.
SUPPLIED_BY_CODE: dict[str, tuple[str, ...]] = {"optimizer": ("params",)}

_CONFIG = ConfigDict(arbitrary_types_allowed=True, extra="ignore", strict=False)


@dataclass(frozen=True)
class _Spec:
    model: type[BaseModel]
    fields: dict[str, str]  # parameter name -> model field name
    types: dict[str, Any]  # parameter name -> expected type
    required: frozenset[str]  # parameters reported missing when absent


_CACHE: dict[Any, _Spec] = {}


def validate_params(entry: registry.Entry, params: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``params`` with each value validated and coerced to the component's parameter type.

    Names must already be known (``registry.check_params`` checks them first); unknown ones pass
    through unchanged. Raises :class:`registry.RegistryError` naming component, parameter, location,
    expected type and the value given.
    """
    spec = model_for(entry)
    at = f" at {where}" if where else ""
    label = f"{entry.kind} {entry.name!r}"
    missing = [n for n in spec.required if n not in params]
    if missing:
        names = ", ".join(repr(n) for n in sorted(missing))
        raise registry.RegistryError(
            f"{label} parameter{'s' if len(missing) > 1 else ''} {names}{at}: required, but not given"
        )
    data = {spec.fields[k]: v for k, v in params.items() if k in spec.fields}
    try:
        validated = spec.model.model_validate(data)
    except ValidationError as err:
        raise registry.RegistryError(_explain(err, spec, params, label, at)) from None
    out = dict(params)
    for key in params:
        if key in spec.fields:
            out[key] = getattr(validated, spec.fields[key])
    return out


def model_for(entry: registry.Entry) -> _Spec:
    """The (cached) pydantic model of a component's recipe parameters."""
    spec = _CACHE.get(entry.target)
    if spec is None:
        spec = _CACHE[entry.target] = _build_spec(entry)
    return spec


def _build_spec(entry: registry.Entry) -> _Spec:
    params = registry.parameters(entry)
    hints = _resolve_hints(entry, params)
    supplied = set(SUPPLIED_BY_CODE.get(entry.kind, ())) if entry.is_class else set()
    fields: dict[str, str] = {}
    expected: dict[str, Any] = {}
    definitions: dict[str, Any] = {}
    required = set()
    for i, (name, p) in enumerate(params.items()):
        tp = hints.get(name, inspect.Parameter.empty)
        if tp is inspect.Parameter.empty:
            tp = _type_of_default(p.default)
        if p.default is None and tp is not Any:
            tp = typing.Optional[tp]
        field = f"p{i}"  # parameter names like 'copy' or 'model_config' would clash with BaseModel's
        fields[name] = field
        expected[name] = tp
        definitions[field] = (tp, None)  # absent parameters are never filled in, so no real default
        if p.default is inspect.Parameter.empty and name not in supplied:
            required.add(name)
    model = _model(f"Params_{entry.kind}_{entry.name}", definitions)
    if model is None:  # some annotation pydantic cannot handle (or a leftover forward reference): Any for it
        for name, field in fields.items():
            if _model("Probe", {"x": definitions[field]}) is None:
                definitions[field] = (Any, None)
                expected[name] = Any
        model = create_model(f"Params_{entry.kind}_{entry.name}", __config__=_CONFIG, **definitions)
    return _Spec(model, fields, expected, frozenset(required))


def _model(name: str, definitions: dict[str, Any]) -> type[BaseModel] | None:
    try:
        model = create_model(name, __config__=_CONFIG, **definitions)
    except Exception:
        return None
    return model if model.__pydantic_complete__ else None


def _resolve_hints(entry: registry.Entry, params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """Resolved annotation per parameter; ``Any`` where a string annotation cannot be resolved."""
    fn = entry.target.__init__ if entry.is_class else entry.target
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # one unresolvable name spoils the whole call: resolve parameter by parameter
        hints = {}
    raw = inspect.unwrap(fn)
    globalns = getattr(raw, "__globals__", None)
    if globalns is None:
        module = sys.modules.get(getattr(raw, "__module__", "") or "")
        globalns = vars(module) if module else {}
    localns = dict(vars(entry.target)) if entry.is_class else None
    out = {}
    for name, p in params.items():
        if name in hints:
            out[name] = hints[name]
        elif p.annotation is inspect.Parameter.empty:
            continue
        elif isinstance(p.annotation, str):
            try:
                out[name] = eval(p.annotation, dict(globalns), localns)  # noqa: S307 - source annotation
            except Exception:
                out[name] = Any
        else:
            out[name] = p.annotation
    return out


def _type_of_default(default: Any) -> Any:
    for tp in (bool, int, float, str):  # bool first: it is an int subclass
        if type(default) is tp:
            return tp
    return Any


# --- messages -----------------------------------------------------------------------------------------

_WORDS = {
    bool: "true or false (bool)",
    int: "a whole number (int)",
    float: "a number (float)",
    str: "a string (str)",
    type(None): "null",
    Any: "any value",
}
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable,
              collections.abc.Collection, collections.abc.Set, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def describe(tp: Any) -> str:
    """A type in plain words: 'a number (float)', "one of 'mean', 'sum'", 'a list of numbers (float)'."""
    if tp in _WORDS:
        return _WORDS[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items ({', '.join(_short(a) for a in args)})"
        item = args[0] if args else Any
        return "a list" + ("" if item is Any else f" of {_short(item)}")
    if origin in _MAPPINGS:
        return "a mapping" + (f" of {_short(args[0])} to {_short(args[1])}" if len(args) == 2 else "")
    if tp in _SEQUENCES:
        return "a list"
    if tp in _MAPPINGS:
        return "a mapping"
    if origin is collections.abc.Callable or tp is collections.abc.Callable or tp is typing.Callable:
        return "a callable"
    return f"a {getattr(tp, '__name__', None) or str(tp)}"


def _short(tp: Any) -> str:
    """A type's short name inside a container description: 'float', 'float or Tensor'."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " or ".join(_short(a) for a in typing.get_args(tp))
    word = describe(tp)
    if word.endswith(")") and "(" in word:
        return word.rsplit("(", 1)[-1].rstrip(")")
    return word[2:] if word.startswith("a ") else word


# pydantic error types meaning "wrong type" (the expected type says it all); others (a constraint such as
# ge=0, an item of a list) add pydantic's own message.
_TYPE_ERRORS = {"missing", "literal_error", "is_instance_of", "is_subclass_of", "none_required", "callable_type",
                "int_from_float", "union_tag_invalid", "enum", "json_invalid"}


def _is_type_error(kind: str) -> bool:
    return kind in _TYPE_ERRORS or kind.endswith("_type") or kind.endswith("_parsing")


def _explain(err: ValidationError, spec: _Spec, params: dict[str, Any], label: str, at: str) -> str:
    by_field = {field: name for name, field in spec.fields.items()}
    details: dict[str, list[str]] = {}
    for e in err.errors():
        name = by_field.get(str(e["loc"][0]), str(e["loc"][0]))
        notes = details.setdefault(name, [])
        items = [str(p) for p in e["loc"][1:] if isinstance(p, int)]
        if items:
            note = f"item {'.'.join(items)}"
            if any(n.startswith(note + ":") for n in notes):  # one note per item (a union fails per member)
                continue
            note += f": {e['msg']}"
        elif not _is_type_error(e["type"]):
            note = e["msg"]
        else:
            continue
        if note not in notes:
            notes.append(note)
    lines = []
    for name, notes in details.items():
        extra = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"{label} parameter {name!r}{at}: expected {describe(spec.types.get(name, Any))}, "
                     f"got {params.get(name)!r}{extra}")
    return "; ".join(lines)
