"""The objects that travel between pipeline stages (design.md §Contracts).

``Rollouts`` is the one container passed from sampler to optimizer: tensors with a leading batch
dimension B (one row per completion) plus per-row Python metadata. Stages read what earlier stages
wrote and add their own fields; they never keep private side channels. ``extras`` holds only fields
declared in :mod:`policylab.fields` (per-row or per-batch), so selection and concatenation know how
to treat every value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from policylab import fields as F


class Extras(dict):
    """``Rollouts.extras``: a dict that accepts declared field names only (see policylab.fields)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key, value):
        F.lookup(key)  # raises FieldError naming the undeclared field
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def copy(self) -> "Extras":
        return Extras(self)


@dataclass
class Rollouts:
    """G completions for each of several prompts.

    Shapes: B completions, P prompt positions (left padded), T completion positions (right padded).
    ``completion_mask`` is 1 on tokens the policy produced and is trained on, 0 on padding and on
    environment/tool tokens. ``group`` is the prompt index; rows of a group need not be contiguous.
    """

    prompt_ids: Tensor  # [B,P] long, left padded
    prompt_mask: Tensor  # [B,P] 1 = real prompt token
    completion_ids: Tensor  # [B,T] long, right padded
    completion_mask: Tensor  # [B,T] float 0/1
    group: Tensor  # [B] long prompt index
    truncated: Tensor  # [B] bool: hit max_new_tokens without EOS
    prompts: list[str] = field(default_factory=list)  # [B] prompt text as given to the model
    completions: list[str] = field(default_factory=list)  # [B] decoded completion text
    rows: list[dict[str, Any]] = field(default_factory=list)  # [B] task row (answer, metadata, extras)
    rewards: Tensor | None = None  # [B] float; NaN where the reward failed
    reward_components: dict[str, Tensor] = field(default_factory=dict)  # name -> [B] (unweighted)
    behavior_logp: Tensor | None = None  # [B,T] log-probs of the sampling policy
    old_logp: Tensor | None = None  # [B,T] log-probs of the policy before this batch's updates
    ref_logp: Tensor | None = None  # [B,T] log-probs of the frozen reference policy
    entropy: Tensor | None = None  # [B,T] token entropy at collection time
    advantages: Tensor | None = None  # [B] or [B,T]
    extras: dict[str, Any] = field(default_factory=Extras)  # declared fields only (policylab.fields)

    def __setattr__(self, name, value):
        if name == "extras" and not isinstance(value, Extras):
            value = Extras(value or {})
        super().__setattr__(name, value)

    def __post_init__(self):
        b = self.completion_ids.shape[0]
        for name in ("prompt_ids", "prompt_mask", "completion_mask", "group", "truncated"):
            t = getattr(self, name)
            if t.shape[0] != b:
                raise ValueError(f"Rollouts.{name} has batch size {t.shape[0]}, completion_ids has {b}")
        if self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError("Rollouts.completion_mask must have the shape of completion_ids")

    # -- shape helpers -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """[B] number of trained tokens per completion."""
        return self.completion_mask.sum(-1)

    def validate(self, who: str = "") -> None:
        """Check every extras value against its declaration (rows, rank, dtype); FieldError names the
        field, its owner and ``who`` (the stage that just ran)."""
        for name, value in self.extras.items():
            try:
                F.lookup(name).check(value, self.batch_size)
            except F.FieldError as err:
                raise F.FieldError(f"after {who}: {err}" if who else str(err)) from None

    def seq_advantages(self) -> Tensor:
        """Advantages broadcast to [B,T] (zeros on masked positions)."""
        if self.advantages is None:
            raise ValueError("advantages have not been computed yet")
        adv = self.advantages
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(self.completion_mask)
        return adv * self.completion_mask

    # -- selection and concatenation -----------------------------------------------------------
    def select(self, index: Tensor | list[int]) -> "Rollouts":
        """Rows ``index`` (a list, long tensor or bool mask) as a new Rollouts."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        idx = index.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extras":
                out[f.name] = {k: (_take(v, index, idx, self.batch_size) if F.lookup(k).per_row else v)
                               for k, v in value.items()}
            else:
                out[f.name] = _take(value, index, idx, self.batch_size)
        return Rollouts(**out)

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        """Stack several Rollouts along the batch, padding prompt (left) and completion (right)."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for f in fields(Rollouts):
            values = [getattr(p, f.name) for p in parts]
            if f.name in ("prompt_ids", "prompt_mask"):
                out[f.name] = _cat_padded(values, left=True)
            elif any(isinstance(v, Tensor) for v in values) or values[0] is None:
                if all(v is None for v in values):
                    out[f.name] = None
                elif any(v is None for v in values):
                    raise ValueError(f"Rollouts.concat: {f.name} is set in some parts and None in others")
                else:
                    out[f.name] = _cat_padded(values, left=False)
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            elif f.name == "extras":
                out[f.name] = _concat_extras(values)
            elif isinstance(values[0], dict):  # reward_components: name -> [B]
                keys = set().union(*values)
                missing = [k for k in keys if any(k not in v for v in values)]
                if missing:
                    raise ValueError(f"Rollouts.concat: reward component(s) {sorted(missing)} missing from some parts")
                out[f.name] = {k: _cat_padded([v[k] for v in values], left=False) for k in sorted(keys)}
        return Rollouts(**out)

    def to(self, device) -> "Rollouts":
        """All tensors (fields, reward components, tensor extras) on ``device``."""
        def move(v):
            if isinstance(v, Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        return Rollouts(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def with_(self, **changes) -> "Rollouts":
        return replace(self, **changes)


def _take(value, index: Tensor, idx: list[int], batch: int):
    if isinstance(value, Tensor):
        return value[index.to(value.device)] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, list) and len(value) == batch:
        return [value[i] for i in idx]
    if isinstance(value, dict):
        return {k: _take(v, index, idx, batch) for k, v in value.items()}
    return value


def _concat_extras(parts: list[dict]) -> dict:
    """Per-row fields are concatenated (right-padded past dim 0); per-batch fields must agree. A field
    present in some parts only is an error: its rows would silently misalign with the others."""
    keys = list(dict.fromkeys(k for p in parts for k in p))
    merged = {}
    for k in keys:
        spec = F.lookup(k)
        if any(k not in p for p in parts):
            have = [i for i, p in enumerate(parts) if k in p]
            raise F.FieldError(f"Rollouts.concat: field {k!r} (owner {spec.owner or '?'}) is in parts {have} of "
                               f"{len(parts)} only; every part must provide it")
        vs = [p[k] for p in parts]
        if spec.per_row:
            if all(isinstance(x, Tensor) for x in vs):
                merged[k] = _cat_padded(vs, left=False)
            elif all(isinstance(x, (list, tuple)) for x in vs):
                merged[k] = [y for x in vs for y in x]
            else:
                raise F.FieldError(f"Rollouts.concat: per-row field {k!r} mixes tensors and lists across parts")
        else:
            first = vs[0]
            for x in vs[1:]:
                same = torch.equal(first, x) if isinstance(first, Tensor) and isinstance(x, Tensor) else first == x
                if not same:
                    raise F.FieldError(f"Rollouts.concat: per-batch field {k!r} (owner {spec.owner or '?'}) differs "
                                       "between parts; declare it per_row=True if it has one value per row")
            merged[k] = first
    return merged


def _cat_padded(tensors: list[Tensor], left: bool) -> Tensor:
    if tensors[0].dim() <= 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        gap = width - t.shape[1]
        if gap:
            pad = torch.zeros(t.shape[0], gap, *t.shape[2:], dtype=t.dtype, device=t.device)
            t = torch.cat([pad, t] if left else [t, pad], dim=1)
        padded.append(t)
    return torch.cat(padded)


@dataclass
class PolicyOutputs:
    """What the training forward pass yields for one micro-batch, over completion positions only."""

    logp: Tensor  # [B,T] log pi_theta(y_t | ...), requires grad
    entropy: Tensor | None = None  # [B,T] token entropy (differentiable when requested)
    hidden: Tensor | None = None  # [B,T,H] last hidden states, when a component asked for them
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Normaliser:
    """Global counts of one optimizer mini-batch, so micro-batch losses sum to the full-batch loss.

    num_tokens: trained tokens in the whole mini-batch (across micro-batches and ranks);
    num_seqs: sequences with at least one trained token; batch_size: all sequences;
    max_len: the constant length normaliser of seq-mean-token-sum-norm (never the batch max).
    """

    num_tokens: float
    num_seqs: float
    batch_size: float
    max_len: float

    @staticmethod
    def of(mask: Tensor, max_len: float) -> "Normaliser":
        lengths = mask.sum(-1)
        return Normaliser(
            num_tokens=float(mask.sum().clamp(min=1)),
            num_seqs=float((lengths > 0).sum().clamp(min=1)),
            batch_size=float(mask.shape[0]),
            max_len=float(max_len),
        )
