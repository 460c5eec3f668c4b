"""Build every component a recipe names, and find the optional hooks they expose (train/context.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from policylab import registry
from policylab.config import Recipe
from policylab.rewards.combine import RewardCombiner
from policylab.train.update import UpdateComponents


def hook(component: Any, name: str):
    """The hook ``name`` of a built component: a method of an instance, or an attribute of the
    registered function (called with the bound parameters) for a function component."""
    if isinstance(component, functools.partial):
        attr = getattr(component.func, name, None)
        return functools.partial(attr, **component.keywords) if callable(attr) else attr
    return getattr(component, name, None)


def needs_reference(component: Any) -> bool:
    h = hook(component, "needs_reference")
    return bool(h() if callable(h) else h)


@dataclass
class Components:
    advantage: Any
    update: UpdateComponents
    rewards: RewardCombiner
    reward_shaping: list = field(default_factory=list)
    group_filter: Any = None
    sampler: Any = None
    engine: Any = None

    def all(self) -> list[tuple[str, Any]]:
        out = [("advantage", self.advantage), ("objective", self.update.objective), ("aggregate", self.update.aggregate)]
        out += [(f"regularizer.{i}", c) for i, c in enumerate(self.update.regularizers)]
        out += [(f"token_weights.{i}", c) for i, c in enumerate(self.update.token_weights)]
        out += [(f"reward_shaping.{i}", c) for i, c in enumerate(self.reward_shaping)]
        if self.group_filter is not None:
            out.append(("group_filter", self.group_filter))
        out.append(("sampler", self.sampler))
        return out

    def with_hook(self, name: str) -> list[tuple[str, Any]]:
        return [(key, c) for key, c in self.all() if hook(c, name) is not None]

    def state_dict(self) -> dict[str, Any]:
        return {key: c.state_dict() for key, c in self.all() if callable(getattr(c, "state_dict", None))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, c in self.all():
            if key in state and callable(getattr(c, "load_state_dict", None)):
                c.load_state_dict(state[key])


def build_components(recipe: Recipe) -> Components:
    alg = recipe.algorithm

    def make(kind, comp, where):
        return registry.build(kind, comp.name, comp.params, where=where)

    update = UpdateComponents(
        objective=make("objective", alg.objective, "algorithm.objective"),
        aggregate=make("aggregate", alg.aggregate, "algorithm.aggregate"),
        regularizers=[make("regularizer", c, f"algorithm.regularizers.{i}") for i, c in enumerate(alg.regularizers)],
        token_weights=[make("token_weights", c, f"algorithm.token_weights.{i}") for i, c in enumerate(alg.token_weights)],
    )
    return Components(
        advantage=make("advantage", alg.advantage, "algorithm.advantage"),
        update=update,
        rewards=RewardCombiner(recipe.rewards),
        reward_shaping=[make("reward_shaping", c, f"algorithm.reward_shaping.{i}") for i, c in enumerate(alg.reward_shaping)],
        group_filter=make("group_filter", alg.group_filter, "algorithm.group_filter") if alg.group_filter else None,
        sampler=make("sampler", recipe.sampler, "sampler"),
        engine=registry.build("rollout_engine", recipe.rollout.engine, {}, where="rollout.engine"),
    )
