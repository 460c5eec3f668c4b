"""Declared data fields: every value that travels in ``Rollouts.extras`` has a schema entry.

A field is per-row (one value per completion, leading dimension B, selected and concatenated with the
rows) or per-batch (one value for the whole batch; concatenating batches requires equal values). Its
owner is the component, engine or loop stage that writes it. ``Rollouts.extras`` rejects undeclared
names when written, ``Rollouts.select``/``concat`` follow the schema, and ``Rollouts.validate`` checks
that per-row values have B rows and the declared number of dimensions and dtype.

A component declares its own fields where it is defined (``declare_field(...)`` at import, or
:class:`FieldSpec` objects in its ``provides``), so a reader finds the producer by the field name.
The built-in ``Rollouts`` attributes (``completion_ids``, ``rewards``, ``ref_logp``, ...) are fields too:
they are listed in :data:`CORE_FIELDS` with the stage that provides them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "long": (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8),
    "bool": (torch.bool,),
}


class FieldError(KeyError):
    """An undeclared, redeclared or malformed field; the message names the field and its owner."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class FieldSpec:
    """One declared field.

    ``shape`` is written with B for the batch, e.g. ``"[B]"``, ``"[B,T]"``, ``"[B,T,H]"``; ``"[B,*]"`` = any
    rank >= 1; ``"list[B]"`` = a Python list with one item per row; ``"scalar"`` / ``"any"`` for per-batch
    values. ``dtype`` is ``"float"``, ``"long"``, ``"bool"`` or ``"any"`` (checked for tensors only).
    """

    name: str
    per_row: bool
    shape: str = "[B]"
    dtype: str = "any"
    owner: str = ""
    doc: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_.]*", self.name):
            raise FieldError(f"field name {self.name!r} must be lower_snake_case")
        if self.dtype not in (*_DTYPES, "any"):
            raise FieldError(f"field {self.name!r}: dtype must be one of float, long, bool, any (got {self.dtype!r})")
        if self.per_row and not (self.shape.startswith("[B") or self.shape == "list[B]"):
            raise FieldError(f"per-row field {self.name!r} needs a shape starting with B, e.g. '[B]' (got {self.shape!r})")

    def check(self, value: Any, batch: int) -> None:
        """Raise FieldError if ``value`` does not fit this declaration for a batch of ``batch`` rows."""
        where = f"field {self.name!r} (owner {self.owner or '?'})"
        if not self.per_row or value is None:
            return
        if self.shape == "list[B]":
            if not isinstance(value, (list, tuple)) or len(value) != batch:
                raise FieldError(f"{where} must be a list with one item per row ({batch}), got {_describe(value)}")
            return
        if not isinstance(value, torch.Tensor):
            raise FieldError(f"{where} must be a tensor of shape {self.shape}, got {_describe(value)}")
        if value.dim() == 0 or value.shape[0] != batch:
            raise FieldError(f"{where} must have {batch} rows (shape {self.shape}), got shape {tuple(value.shape)}")
        dims = self.shape.strip("[]").split(",")
        if "*" not in dims and value.dim() != len(dims):
            raise FieldError(f"{where} must have shape {self.shape}, got shape {tuple(value.shape)}")
        if self.dtype != "any" and value.dtype not in _DTYPES[self.dtype]:
            raise FieldError(f"{where} must have a {self.dtype} dtype, got {value.dtype}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


_FIELDS: dict[str, FieldSpec] = {}


def declare_field(name: str, *, per_row: bool, shape: str = "[B]", dtype: str = "any", owner: str = "",
                  doc: str = "") -> FieldSpec:
    """Declare an extras field (idempotent for an identical declaration; a conflicting one is an error)."""
    spec = FieldSpec(name, per_row, shape, dtype, owner, doc)
    return declare(spec)


def declare(spec: FieldSpec) -> FieldSpec:
    if spec.name in CORE_FIELDS:
        raise FieldError(f"field {spec.name!r} is a built-in Rollouts attribute (provided by {CORE_FIELDS[spec.name]}); "
                         "choose another name")
    old = _FIELDS.get(spec.name)
    if old is not None and (old.per_row, old.shape, old.dtype) != (spec.per_row, spec.shape, spec.dtype):
        raise FieldError(f"field {spec.name!r} is declared twice with different schemas: by {old.owner or '?'} "
                         f"({old.shape}, {old.dtype}) and by {spec.owner or '?'} ({spec.shape}, {spec.dtype})")
    if old is None or (not old.doc and spec.doc):
        _FIELDS[spec.name] = spec
    return _FIELDS[spec.name]


def lookup(name: str) -> FieldSpec:
    """The declaration of extras field ``name``; FieldError with the nearest declared names otherwise."""
    spec = _FIELDS.get(name)
    if spec is None:
        from policylab.registry import load_all

        load_all()  # component modules declare their fields when imported
        spec = _FIELDS.get(name)
    if spec is None:
        from policylab.registry import suggest

        raise FieldError(f"Rollouts.extras field {name!r} is not declared" + suggest(name, _FIELDS)
                         + "; declare it with policylab.fields.declare_field(...) or a FieldSpec in the "
                         "writing component's `provides`")
    return spec


def is_declared(name: str) -> bool:
    return name in _FIELDS or name in CORE_FIELDS


def declared() -> dict[str, FieldSpec]:
    return dict(_FIELDS)


# The Rollouts attributes, and which stage provides each (the chain check starts from these).
CORE_FIELDS: dict[str, str] = {
    "prompt_ids": "rollout engine",
    "prompt_mask": "rollout engine",
    "completion_ids": "rollout engine",
    "completion_mask": "rollout engine",
    "group": "rollout engine",
    "truncated": "rollout engine",
    "prompts": "rollout engine",
    "completions": "rollout engine",
    "rows": "rollout engine",
    "behavior_logp": "rollout engine",
    "rewards": "reward stage",
    "reward_components": "reward stage",
    "old_logp": "annotator 'old_logp'",
    "ref_logp": "annotator 'reference_logp'",
    "entropy": "annotator 'policy_entropy'",
    "advantages": "advantage",
}
# Provided before any component runs: what the engine returns and the reward stage adds.
ENGINE_FIELDS = frozenset(k for k, v in CORE_FIELDS.items() if v == "rollout engine")
REWARD_FIELDS = frozenset({"rewards", "reward_components"})

# Loop-owned extras.
declare_field("max_new_tokens", per_row=False, shape="scalar", owner="train loop",
              doc="rollout.max_new_tokens of the batch (length penalties and constant-length normalisers)")
