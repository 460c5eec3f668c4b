"""Build every component a recipe names, plan their stages (train/stages.py) and find their hooks.

Hooks and declarations are documented once, in policylab/interfaces.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policylab import registry
from policylab.config import Recipe
from policylab.interfaces import attribute
from policylab.rewards.combine import RewardCombiner
from policylab.train.stages import ChainError, StagePlan, describe, plan
from policylab.train.update import UpdateComponents

hook = attribute  # the loop's name for "the hook of a built component"


@dataclass
class Components:
    advantage: Any
    update: UpdateComponents
    rewards: RewardCombiner
    reward_shaping: list = field(default_factory=list)
    group_filter: Any = None
    sampler: Any = None
    engine: Any = None
    annotators: list = field(default_factory=list)  # (recipe location, component) from algorithm.annotators
    batch_transforms: list = field(default_factory=list)  # (recipe location, component)
    plan: StagePlan = field(default_factory=StagePlan)

    def all(self) -> list[tuple[str, Any]]:
        """(recipe location, component) of every component whose hooks and state the loop honours."""
        out = [("algorithm.advantage", self.advantage), ("algorithm.objective", self.update.objective),
               ("algorithm.aggregate", self.update.aggregate)]
        out += [(f"algorithm.regularizers.{i}", c) for i, c in enumerate(self.update.regularizers)]
        out += [(f"algorithm.token_weights.{i}", c) for i, c in enumerate(self.update.token_weights)]
        out += [(f"algorithm.rollout_correction.{i}", c) for i, c in enumerate(self.update.rollout_correction)]
        out += [(f"algorithm.reward_shaping.{i}", c) for i, c in enumerate(self.reward_shaping)]
        if self.group_filter is not None:
            out.append(("algorithm.group_filter", self.group_filter))
        out += list(self.batch_transforms) + list(self.annotators)
        out.append(("sampler", self.sampler))
        out.append(("rollout.engine", self.engine))
        return out

    def with_hook(self, name: str) -> list[tuple[str, Any]]:
        return [(key, c) for key, c in self.all() if hook(c, name) is not None]

    def state_dict(self) -> dict[str, Any]:
        return {_state_key(key): c.state_dict() for key, c in self.all() if callable(getattr(c, "state_dict", None))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, c in self.all():
            key = _state_key(key)
            if key in state and callable(getattr(c, "load_state_dict", None)):
                c.load_state_dict(state[key])


def _state_key(where: str) -> str:
    # checkpoint keys predate recipe locations: "advantage", "regularizer.0", ...; keep them readable and stable
    key = where.removeprefix("algorithm.")
    return {"regularizers": "regularizer", "token_weights": "token_weights"}.get(key.split(".")[0], key.split(".")[0]) + \
        ("." + key.split(".", 1)[1] if "." in key else "")


def stage_list(parts: Components) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The components of each stage in loop order (what train/stages.py plans over)."""
    u = parts.update
    prepare = parts.all()  # any component (the sampler included) may annotate or transform
    return [
        ("engine", [("rollout.engine", parts.engine)]),
        ("reward_shaping", [(f"algorithm.reward_shaping.{i}", c) for i, c in enumerate(parts.reward_shaping)]),
        ("group_filter", [("algorithm.group_filter", parts.group_filter)] if parts.group_filter is not None else []),
        ("prepare", prepare),
        ("advantage", [("algorithm.advantage", parts.advantage)]),
        ("update", [("algorithm.objective", u.objective), ("algorithm.aggregate", u.aggregate)]
         + [(f"algorithm.regularizers.{i}", c) for i, c in enumerate(u.regularizers)]
         + [(f"algorithm.token_weights.{i}", c) for i, c in enumerate(u.token_weights)]
         + [(f"algorithm.rollout_correction.{i}", c) for i, c in enumerate(u.rollout_correction)]),
    ]


def check_aggregates(parts: Components, aggregate: str) -> None:
    """A loss written for one aggregation (``aggregates = (...)``, e.g. a sequence-level loss spread over
    tokens) is wrong under another: fail at build time, naming both."""
    for where, c in parts.all():
        allowed = attribute(c, "aggregates")
        if allowed and aggregate not in allowed:
            raise ChainError(f"{where} ({describe(c)}) is written for algorithm.aggregate in {list(allowed)}, "
                             f"but the recipe uses {aggregate!r}; set algorithm.aggregate.name to {allowed[0]!r}")


def build_components(recipe: Recipe) -> Components:
    """Build every component and check that their requires/provides chain (ChainError otherwise).

    Runs before any model loads, so a recipe that cannot work fails in seconds."""
    alg = recipe.algorithm

    def make(kind, comp, where):
        built = registry.build(kind, comp.name, comp.params, where=where)
        try:
            built.component_name = f"{kind} {comp.name!r}"
        except AttributeError:  # a plain function without parameters is shared: leave it unnamed
            pass
        return built

    update = UpdateComponents(
        objective=make("objective", alg.objective, "algorithm.objective"),
        aggregate=make("aggregate", alg.aggregate, "algorithm.aggregate"),
        regularizers=[make("regularizer", c, f"algorithm.regularizers.{i}") for i, c in enumerate(alg.regularizers)],
        token_weights=[make("token_weights", c, f"algorithm.token_weights.{i}") for i, c in enumerate(alg.token_weights)],
        rollout_correction=[make("rollout_correction", c, f"algorithm.rollout_correction.{i}")
                            for i, c in enumerate(alg.rollout_correction)],
    )
    engine = recipe.rollout.engine
    parts = Components(
        advantage=make("advantage", alg.advantage, "algorithm.advantage"),
        update=update,
        rewards=RewardCombiner(recipe.rewards, timeout_s=recipe.train.reward_timeout_s),
        reward_shaping=[make("reward_shaping", c, f"algorithm.reward_shaping.{i}") for i, c in enumerate(alg.reward_shaping)],
        group_filter=make("group_filter", alg.group_filter, "algorithm.group_filter") if alg.group_filter else None,
        sampler=make("sampler", recipe.sampler, "sampler"),
        engine=make("rollout_engine", engine, "rollout.engine"),
        annotators=[(f"algorithm.annotators.{i}", make("annotator", c, f"algorithm.annotators.{i}"))
                    for i, c in enumerate(alg.annotators)],
        batch_transforms=[(f"algorithm.batch_transforms.{i}", make("batch_transform", c, f"algorithm.batch_transforms.{i}"))
                          for i, c in enumerate(alg.batch_transforms)],
    )
    check_aggregates(parts, alg.aggregate.name)
    parts.plan = plan(stage_list(parts))
    return parts
