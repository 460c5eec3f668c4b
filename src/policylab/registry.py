"""One registry for every component kind (design.md §Contracts).

A component is a function or a class registered under ``(kind, name)``. Recipes name components and
give their parameters; :func:`build` validates those parameters against the component's signature and
returns a ready-to-call object. Unknown kinds, names and parameters raise :class:`RegistryError` with
the nearest valid spelling, so a typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

KINDS = (
    "advantage",  # (rollouts, **params) -> advantages [B] or [B,T]
    "objective",  # (policy_outputs, rollouts, **params) -> (loss [B,T], metrics)
    "regularizer",  # same contract as objective; its loss is added before aggregation
    "token_weights",  # (policy_outputs, rollouts, **params) -> (weights [B,T], metrics)
    "rollout_correction",  # (policy_outputs, rollouts, **params) -> (detached factors [B,T], metrics)
    "aggregate",  # (loss [B,T], mask [B,T], normaliser) -> scalar
    "reward",  # (prompt, completion, row, **params) -> float | None
    "reward_shaping",  # (rollouts, **params) -> (reward delta [B], metrics)
    "group_filter",  # (rollouts, **params) -> keep [num_groups] bool
    "sampler",  # class: next_batch(n) -> list[int]; update(stats); state_dict/load_state_dict
    "prompt_transform",  # class/func applied to prompts before generation
    "optimizer",  # torch.optim.Optimizer subclass or factory(params, **kw)
    "task",  # (**params) -> Task
    "rollout_engine",  # class: bind(model, tokenizer); generate(requests, sampling) -> Rollouts
    "annotator",  # class: annotate(rollouts, ctx) -> {declared field: value}, once per batch
    "batch_transform",  # class: transform(rollouts, ctx) -> Rollouts (adds or drops rows)
    "environment",  # class, one instance per trajectory: reset(task_row, seed) -> obs; step(action) -> (obs, done, reward, info)
)
# The call signature and hooks of each kind: policylab/interfaces.py.

# Packages whose modules register components when imported. Importing every module of these packages
# (instead of a hand-kept list) lets a new family file register itself just by existing.
_COMPONENT_PACKAGES = (
    "policylab.algo",
    "policylab.rewards",
    "policylab.environments",
    "policylab.tasks",
    "policylab.sampling",
    "policylab.rollout",
    "policylab.annotate",
)


class RegistryError(KeyError):
    """An unknown kind, component or parameter; the message names it and suggests the nearest."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    target: Callable[..., Any]
    summary: str
    spec: str  # spec section, e.g. "objectives.md §1.1"
    tags: frozenset = frozenset()  # e.g. "skip:T-ONPOL" where the spec says a shared property does not hold

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.target)


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_loaded = False


def suggest(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or a list of valid options when none is close."""
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    shown = ", ".join(options[:30]) + (" ..." if len(options) > 30 else "")
    return f" (valid: {shown})"


def register(kind: str, name: str, *, spec: str = "", aliases: tuple[str, ...] = (), tags: tuple[str, ...] = (),
             requires: tuple = (), provides: tuple = ()):
    """Decorator: register a function or class as component ``name`` of ``kind``.

    ``tags`` carry facts the shared tests read, e.g. ``"skip:T-ONPOL"`` for an objective whose spec says
    it does not reduce to REINFORCE on-policy (the docstring must say why). ``requires``/``provides``
    declare the Rollouts fields a function component reads/writes (classes set them as attributes);
    see policylab/interfaces.py.
    """
    if kind not in _ENTRIES:
        raise RegistryError(f"unknown component kind {kind!r}" + suggest(kind, KINDS))

    def deco(target):
        for attr, value in (("requires", requires), ("provides", provides)):
            if value:  # a tuple, or a function of the component's parameters returning one
                setattr(target, attr, value if callable(value) else tuple(value))
        doc = inspect.getdoc(target) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        for key in (name, *aliases):
            existing = _ENTRIES[kind].get(key)
            if existing is not None and existing.target is not target:
                raise RegistryError(f"{kind} {key!r} is registered twice ({existing.target.__module__} and {target.__module__})")
            _ENTRIES[kind][key] = Entry(kind, key, target, summary, spec, frozenset(tags))
        return target

    return deco


def load_all() -> None:
    """Import every module of the component packages once, so their @register calls run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in _COMPONENT_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            importlib.import_module(info.name)


def entries(kind: str) -> dict[str, Entry]:
    load_all()
    if kind not in _ENTRIES:
        raise RegistryError(f"unknown component kind {kind!r}" + suggest(kind, KINDS))
    return dict(_ENTRIES[kind])


def names(kind: str) -> list[str]:
    return sorted(entries(kind))


def get(kind: str, name: str) -> Entry:
    table = entries(kind)
    if name not in table:
        raise RegistryError(f"unknown {kind} {name!r}" + suggest(name, table))
    return table[name]


def parameters(entry: Entry) -> dict[str, inspect.Parameter]:
    """Keyword parameters a recipe may set (keyword-only args of a function, __init__ args of a class)."""
    sig = inspect.signature(entry.target.__init__ if entry.is_class else entry.target)
    out = {}
    for p in sig.parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if entry.is_class or p.kind == p.KEYWORD_ONLY:
            out[p.name] = p
    return out


def check_params(entry: Entry, params: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check names (nearest spelling on a typo), then types; return the params coerced to their types."""
    allowed = parameters(entry)
    for key in params:
        if key not in allowed:
            at = f" at {where}" if where else ""
            raise RegistryError(
                f"{entry.kind} {entry.name!r} has no parameter {key!r}{at}" + suggest(key, allowed)
            )
    from policylab.params import validate_params  # lazy: policylab.params imports this module

    return validate_params(entry, params, where)


def build(kind: str, name: str, params: dict[str, Any] | None = None, where: str = ""):
    """Return the component ready to call: a class instance, or the function with its params bound."""
    entry = get(kind, name)
    params = check_params(entry, dict(params or {}), where)
    if entry.is_class:
        return entry.target(**params)
    if not params:
        return entry.target
    bound = functools.partial(entry.target, **params)
    functools.update_wrapper(bound, entry.target)
    return bound
