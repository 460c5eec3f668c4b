"""The typed interface of every component kind, and the declarations the loader checks.

This page is the one place that lists what a component of each kind is called with, which optional
hooks the loop honours, and what it may declare. A component is a registered function or class
(:mod:`policylab.registry`); it satisfies the ``Protocol`` of its kind.

Declarations (class attributes, or for a function component keyword arguments of ``register``):

``requires``
    Rollouts fields the component reads: built-in attributes (``ref_logp``, ``entropy``, ``rewards``, ...;
    see :data:`policylab.fields.CORE_FIELDS`) or declared extras. A method ``requires(self)`` may compute
    them from the component's parameters.
``provides``
    Fields the component writes: names, or :class:`~policylab.fields.FieldSpec` objects (declared when the
    component is built). Only annotators, batch transforms, reward shapings and engines write fields.
``needs_hidden`` / ``needs_entropy_grad`` / ``needs_whole_groups``
    What the update stage must do for it: fill ``PolicyOutputs.hidden``, keep the entropy's graph, cut
    micro/mini-batches at group boundaries.
``needs_reference_model``
    (annotators) the frozen reference policy is loaded and passed as ``ctx.reference``.

Hooks any component may have, called by the loop:

``annotate(rollouts, ctx) -> dict[str, value]``
    Runs once per batch after rewards (and group filtering), before the advantage. Returns exactly the
    fields it ``provides``; never edits the batch in place, never adds or drops rows.
``transform(rollouts, ctx) -> Rollouts``
    A batch transform: may add or drop rows (filters, pivots, added pairs). Its declared ``provides``
    must be set on the returned batch.
``sampling_transforms() -> list[LogitsTransform]``
    Engine-neutral changes to the next generation's sampling distribution (data, not engine objects).
``after_step(metrics)`` / ``last_metrics`` / ``state_dict()`` + ``load_state_dict(state)``
    Once per step after the optimizer; floats merged into the step's metrics; checkpointed state.

Annotators and batch transforms run in the order their requires/provides imply (a topological order;
ties keep the recipe's order), not in file or registration order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from torch import Tensor

from policylab import fields as F
from policylab.rollouts import Normaliser, PolicyOutputs, Rollouts

Metrics = dict[str, float]


# -- one Protocol per kind --------------------------------------------------------------------------


@runtime_checkable
class Advantage(Protocol):
    def __call__(self, rollouts: Rollouts) -> Tensor: ...  # [B] or [B,T]


@runtime_checkable
class Objective(Protocol):
    def __call__(self, outputs: PolicyOutputs, rollouts: Rollouts) -> tuple[Tensor, Metrics]: ...  # loss [B,T]


Regularizer = Objective  # same contract; its per-token loss is added before aggregation


@runtime_checkable
class TokenWeights(Protocol):
    def __call__(self, outputs: PolicyOutputs, rollouts: Rollouts) -> tuple[Tensor, Metrics]: ...  # weights [B,T]


@runtime_checkable
class RolloutCorrection(Protocol):
    """Behaviour-vs-training mismatch (``algorithm.rollout_correction``): detached factors [B,T] from
    ``rollouts.behavior_logp`` and the training side (``old_logp``, else sg(outputs.logp)), multiplied into the
    objective's per-token loss before the regularizers; 1 everywhere when the two log-probs are equal."""

    def __call__(self, outputs: PolicyOutputs, rollouts: Rollouts) -> tuple[Tensor, Metrics]: ...


@runtime_checkable
class Aggregate(Protocol):
    def __call__(self, loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor: ...  # scalar


@runtime_checkable
class Reward(Protocol):
    def __call__(self, prompt: str, completion: str, row: dict) -> float | None: ...


@runtime_checkable
class RewardShaping(Protocol):
    def __call__(self, rollouts: Rollouts) -> tuple[Tensor, Metrics]: ...  # reward delta [B]


@runtime_checkable
class GroupFilter(Protocol):
    def __call__(self, rollouts: Rollouts) -> Tensor: ...  # keep [num groups] bool


@runtime_checkable
class Sampler(Protocol):
    def bind(self, size: int, seed: int) -> None: ...
    def next_batch(self, n: int) -> list[int]: ...
    def update(self, stats: dict[str, Any]) -> None: ...


@runtime_checkable
class PromptTransform(Protocol):
    def __call__(self, rows: list[dict]) -> list[dict]: ...


@runtime_checkable
class Annotator(Protocol):
    provides: tuple

    def annotate(self, rollouts: Rollouts, ctx: "StageContext") -> dict[str, Any]: ...


@runtime_checkable
class BatchTransform(Protocol):
    def transform(self, rollouts: Rollouts, ctx: "StageContext") -> Rollouts: ...


@dataclass(frozen=True)
class LogitsTransform:
    """An engine-neutral change to the sampling distribution, described as data.

    ``kind`` names the transform (e.g. ``"entropy_temperature"``); ``params`` are plain values or tensors.
    An engine applies the kinds it implements (before the behaviour log-probs are recorded, so the
    on-policy ratio stays 1) and raises a clear error for any other kind.
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sampling:
    """Sampling settings of one generate call (engine-neutral)."""

    group_size: int = 8
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 0  # completions per forward batch; 0 = all at once
    transforms: tuple[LogitsTransform, ...] = ()


@runtime_checkable
class RolloutEngine(Protocol):
    """Generation behind one interface (hf, hf_pruned, vllm, a multi-turn loop).

    ``generate(requests, sampling)``: a request is a task row (``{"prompt": ..., "answer": ...}``) or a
    row with ``"messages"`` (a chat message list); returns Rollouts with the engine fields
    (:data:`policylab.fields.ENGINE_FIELDS`, behaviour log-probs included) and ``group`` numbered from
    ``group_offset``. ``update_weights`` is called after every optimizer step; ``sleep``/``wake`` bracket
    the update (free generation memory); ``close`` at the end of the run.
    """

    provides: tuple

    def bind(self, model: Any, tokenizer: Any) -> None: ...
    def generate(self, requests: list[dict], sampling: Sampling, *, group_offset: int = 0) -> Rollouts: ...
    def update_weights(self, model_or_state_dict: Any) -> None: ...
    def sleep(self) -> None: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...


class StageContext(Protocol):
    """What an annotator or batch transform may reach beyond the Rollouts (built by the train loop)."""

    policy: Any  # the trained model (no grad inside annotators)
    reference: Any | None  # frozen reference policy, when an annotator declared needs_reference_model
    tokenizer: Any
    device: Any
    step: int
    temperature: float  # the training forward's temperature
    reward: Callable[..., tuple[Tensor, dict[str, Tensor]]]  # (prompts, completions, rows) -> (total, parts)

    def score(self, rollouts: Rollouts, model: Any = None, with_hidden: bool = False) -> PolicyOutputs: ...
    def generate(self, requests: list[dict], **sampling_overrides) -> Rollouts: ...


# -- declarations -----------------------------------------------------------------------------------


def attribute(component: Any, name: str):
    """Attribute ``name`` of a built component: of the instance, or of the registered function (with the
    recipe's parameters bound, for callables) when the component is a ``functools.partial``."""
    if isinstance(component, functools.partial):
        attr = getattr(component.func, name, None)
        if callable(attr) and not isinstance(attr, (tuple, list)):
            return functools.partial(attr, **component.keywords)
        return attr
    return getattr(component, name, None)


def _names(value: Iterable) -> tuple[str, ...]:
    out = []
    for v in value or ():
        if isinstance(v, F.FieldSpec):
            F.declare(v)
            out.append(v.name)
        else:
            out.append(str(v))
    return tuple(out)


def declared(component: Any, what: str) -> tuple[str, ...]:
    """The component's ``requires`` or ``provides`` as field names (FieldSpecs are declared on the way)."""
    value = attribute(component, what)
    if callable(value):
        value = value()
    if isinstance(value, str):
        value = (value,)
    return _names(value)


def flag(component: Any, name: str) -> bool:
    value = attribute(component, name)
    return bool(value() if callable(value) else value)


def has_hook(component: Any, name: str) -> bool:
    return callable(attribute(component, name))
