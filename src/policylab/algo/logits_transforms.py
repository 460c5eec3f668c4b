"""Engine-neutral sampling transforms: what a :class:`~policylab.interfaces.LogitsTransform` means.

A component describes a change to the next generation's sampling distribution as data
(``LogitsTransform(kind, params)``, from its ``sampling_transforms()`` hook); every rollout engine applies
it through this table, so the same change works in the ``hf``/``hf_pruned`` engines and any other.

``TRANSFORMS[kind](logits [N,V] float, **params) -> logits [N,V]`` is the transform itself. Kinds that
rescale the temperature per token also have ``TEMPERATURE_FACTORS[kind](logits, **params) -> [N]`` (the
factor T_t/T0 the logits are divided by), which engines report per row (``sampling_temperature_factor``).
Engines apply the transforms to the raw next-token logits, before dividing by the sampling temperature T0
and before recording behaviour log-probs, so the recorded log-probs are those of the distribution sampled.

Pure torch: this module imports nothing of the loop, the engines or transformers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from policylab.interfaces import LogitsTransform


def entropy_temperature_factor(logits: Tensor, *, tau: float, pivot: float, rms: float, pos_max: float,
                               neg_min: float) -> Tensor:
    """HAPO's per-token temperature factor T_t/T0 = 1 + tau*h^ (objectives.md §2.7a) from the raw
    next-token logits [N,V]; returns [N] (float32).

    H is the entropy of softmax(logits), computed in fp32; h = (log max(H, 1e-6) - pivot)/(rms + 1e-6), scaled
    by ``pos_max`` when positive and by ``|neg_min|`` otherwise, clamped to [-1, 1]. ``pivot``, ``rms``,
    ``pos_max``, ``neg_min`` are the previous batch's entropy statistics (HapoEntropyStats).
    """
    z = logits.float()
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
    h = (torch.log(entropy.clamp(min=1e-6)) - pivot) / (rms + 1e-6)
    h_hat = torch.where(h > 0, h / pos_max, h / abs(neg_min)).clamp(-1, 1)
    return 1 + tau * h_hat


def entropy_temperature(logits: Tensor, **params) -> Tensor:
    """logits / (1 + tau*h^): HAPO's entropy-adaptive temperature, relative to the engine's own T0."""
    return logits / entropy_temperature_factor(logits, **params).to(logits.dtype)[:, None]


TRANSFORMS: dict[str, Callable[..., Tensor]] = {
    "entropy_temperature": entropy_temperature,
}
TEMPERATURE_FACTORS: dict[str, Callable[..., Tensor]] = {
    "entropy_temperature": entropy_temperature_factor,
}


def check_transforms(transforms: Iterable[LogitsTransform], engine: str = "rollout engine",
                     supported: Iterable[str] | None = None) -> None:
    """ValueError naming the kind, the engine and the kinds it supports, for any kind it cannot apply."""
    kinds = sorted(TRANSFORMS if supported is None else supported)
    for t in transforms:
        if t.kind not in kinds:
            raise ValueError(f"sampling transform {t.kind!r} is not supported by the {engine} engine; "
                             f"it supports {kinds}")


def apply_transforms(logits: Tensor, transforms: Iterable[LogitsTransform],
                     engine: str = "rollout engine") -> tuple[Tensor, Tensor]:
    """(transformed logits [N,V], temperature factor [N]) after every transform in order.

    The factor is the product of the temperature-rescaling kinds' factors (1 for other kinds, and when
    there are no transforms).
    """
    factor = torch.ones(logits.shape[0], device=logits.device, dtype=torch.float32)
    for t in transforms:
        if t.kind not in TRANSFORMS:
            check_transforms([t], engine)
        if t.kind in TEMPERATURE_FACTORS:
            f = TEMPERATURE_FACTORS[t.kind](logits, **t.params)
            logits = logits / f.to(logits.dtype)[:, None]
            factor = factor * f.float()
        else:
            logits = TRANSFORMS[t.kind](logits, **t.params)
    return logits, factor
