"""The stage plan: which fields each component requires and provides, checked as a chain before any
model loads, and the order in which annotators and batch transforms run (derived, not written).

Stages, in loop order: engine -> rewards -> reward shaping -> group filter -> annotators and batch
transforms (topological order of their requires/provides; ties keep the recipe's order) -> advantage
-> update (objective, regularizers, token weights, aggregate). A field a component requires must be
provided by an earlier stage; a field with no provider in the recipe is supplied by a registered
``auto_provider`` annotator when exactly one provides it (the reference scorer for ``ref_logp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policylab import fields as F
from policylab import registry
from policylab.interfaces import declared, flag, has_hook


class ChainError(ValueError):
    """The recipe's components do not chain: a required field has no provider (message names both)."""


@dataclass
class Node:
    where: str  # recipe location, e.g. "algorithm.advantage"
    component: Any
    hook: str  # "annotate" or "transform"
    requires: tuple[str, ...]
    provides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.where} ({describe(self.component)})"


@dataclass
class StagePlan:
    prepare: list[Node] = field(default_factory=list)  # annotators/transforms in run order
    needs_reference_model: bool = False
    provided: dict[str, str] = field(default_factory=dict)  # field -> who provides it (for messages/docs)


def describe(component: Any) -> str:
    """``objective 'ppo_clip'`` for a component built by train/components.py, else its type name."""
    name = getattr(component, "component_name", None)
    if name:
        return name
    target = getattr(component, "func", component)
    return getattr(target, "__name__", type(component).__name__)


def _providers_hint(name: str) -> str:
    """Registered components that provide ``name``, for the error message."""
    hints = []
    for kind in ("annotator", "batch_transform", "reward_shaping", "rollout_engine"):
        for entry_name, entry in registry.entries(kind).items():
            try:
                provides = declared(entry.target, "provides") if not callable(getattr(entry.target, "provides", None)) else ()
            except Exception:  # a parameter-dependent declaration cannot be read without parameters
                provides = ()
            if name in provides:
                hints.append(f"{kind} {entry_name!r}")
    return ("; registered providers: " + ", ".join(sorted(hints))) if hints else ""


def plan(stages: list[tuple[str, list[tuple[str, Any]]]], auto_candidates: dict[str, str] | None = None) -> StagePlan:
    """Check the chain and order the prepare stage.

    ``stages``: in loop order, ``(stage name, [(recipe location, built component), ...])`` with stage names
    ``engine``, ``reward_shaping``, ``group_filter``, ``prepare`` (annotators/transforms), ``advantage``,
    ``update``. ``auto_candidates``: field -> registered auto-provider annotator name (default: looked up).
    """
    out = StagePlan()
    available: dict[str, str] = {k: v for k, v in F.CORE_FIELDS.items() if k in F.ENGINE_FIELDS}
    available.update({k: "reward stage" for k in F.REWARD_FIELDS})
    available["max_new_tokens"] = "train loop"
    auto = _auto_providers() if auto_candidates is None else auto_candidates

    def need(where_label: str, names: tuple[str, ...], own: tuple[str, ...] = ()) -> None:
        for name in names:
            if name in available or name in own:
                continue
            if not F.is_declared(name):
                raise ChainError(f"{where_label} requires field {name!r}, which is not a Rollouts attribute or a declared "
                                 "extras field" + registry.suggest(name, list(F.CORE_FIELDS) + list(F.declared())))
            raise ChainError(f"{where_label} requires field {name!r}, which nothing before it in this recipe provides"
                             + _providers_hint(name))

    for stage, members in stages:
        if stage == "prepare":
            nodes = [_node(where, c) for where, c in members]
            nodes = [n for n in nodes if n is not None]
            # fields nobody in the recipe provides, supplied by an auto-provider annotator
            provided_here = {p for n in nodes for p in n.provides} | set(available)
            wanted = {r for n in nodes for r in n.requires} | set(_later_requires(stages, stage))
            for name in sorted(wanted - provided_here):
                if name in auto:
                    comp = registry.build("annotator", auto[name], {}, where=f"auto annotator {auto[name]!r}")
                    nodes.insert(0, _node(f"annotator {auto[name]!r} (added for {name!r})", comp))
            ordered = _toposort(nodes, available)
            for n in ordered:
                need(n.label, n.requires, n.provides)
                available.update({p: n.label for p in n.provides})
                out.needs_reference_model |= flag(n.component, "needs_reference_model")
            out.prepare = ordered
            continue
        for where, c in members:
            label = f"{where} ({describe(c)})"
            need(label, declared(c, "requires"), declared(c, "provides"))
            available.update({p: label for p in declared(c, "provides")})
        if stage == "advantage":
            available["advantages"] = "advantage"
    out.provided = dict(available)
    return out


def _later_requires(stages, current: str) -> list[str]:
    after, names = False, []
    for stage, members in stages:
        if stage == current:
            after = True
            continue
        if after:
            for _, c in members:
                names += list(declared(c, "requires"))
    return names


def _node(where: str, component: Any) -> Node | None:
    hook = "transform" if has_hook(component, "transform") else "annotate" if has_hook(component, "annotate") else None
    if hook is None:
        return None
    provides = declared(component, "provides")
    requires = tuple(r for r in declared(component, "requires") if r not in provides)
    return Node(where, component, hook, requires, provides)


def _auto_providers() -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for name, entry in registry.entries("annotator").items():
        if getattr(entry.target, "auto_provider", False):
            for p in declared(entry.target, "provides"):
                out.setdefault(p, []).append(name)
    return {k: v[0] for k, v in out.items() if len(v) == 1}


def _toposort(nodes: list[Node], available: dict[str, str]) -> list[Node]:
    """Kahn's algorithm. Among ready nodes, batch transforms run first (rows they add or drop would otherwise
    miss, or waste, an earlier annotator's per-row values), then the earliest in recipe order."""
    providers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for p in n.provides:
            providers.setdefault(p, []).append(i)
    deps = [{j for r in n.requires if r not in available for j in providers.get(r, []) if j != i}
            for i, n in enumerate(nodes)]
    done: list[int] = []
    remaining = list(range(len(nodes)))
    while remaining:
        ready = sorted((i for i in remaining if deps[i] <= set(done)), key=lambda i: nodes[i].hook != "transform")
        if not ready:
            cycle = ", ".join(nodes[i].label for i in remaining)
            raise ChainError(f"annotators/transforms require each other's fields in a cycle: {cycle}")
        done.append(ready[0])
        remaining.remove(ready[0])
    return [nodes[i] for i in done]
