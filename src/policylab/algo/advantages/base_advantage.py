"""The registered advantage a shaping method starts from (``base: grpo`` in a recipe), built once.

Shaping estimators (SPAE, GRPO-VPS, VERL, AEM, ASPO, GUI-Libra, ...) take a base advantage and reshape it;
:class:`BaseAdvantage` builds it from the registry and passes its state through checkpoints.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from policylab import registry
from policylab.interfaces import declared
from policylab.rollouts import Rollouts


class BaseAdvantage:
    """A registered advantage (e.g. ``grpo``) used as the starting point of a shaping method.

    Stateful bases (BNPO, ...) keep their state: ``state_dict``/``load_state_dict`` pass through; the
    fields the base reads are its ``requires`` (for the owner's own declaration).
    """

    def __init__(self, name: str = "grpo", params: dict[str, Any] | None = None):
        self.name = name
        self.component = registry.build("advantage", name, params or {}, where=f"base advantage {name!r}")

    def __call__(self, rollouts: Rollouts) -> Tensor:
        return self.component(rollouts).float()

    def sequence(self, rollouts: Rollouts, who: str) -> Tensor:
        """The base advantage [B]; a clear error when the base returned token-level advantages."""
        adv = self(rollouts)
        if adv.dim() != 1:
            raise ValueError(f"{who} shapes a sequence-level base advantage; base {self.name!r} returned [B,T]")
        return adv

    @property
    def requires(self) -> tuple[str, ...]:
        return declared(self.component, "requires")

    def state_dict(self) -> dict:
        fn = getattr(self.component, "state_dict", None)
        return fn() if callable(fn) else {}

    def load_state_dict(self, state: dict) -> None:
        fn = getattr(self.component, "load_state_dict", None)
        if callable(fn) and state:
            fn(state)


def broadcast_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """[B] or [B,T] advantages as [B,T] (zeros on masked positions)."""
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(mask)
    return adv * mask
