"""Drift guard: the rollout engine's behaviour log-probs against the training forward of the same weights on
the same tokens, at the first step and every N steps (``train.drift_guard``). On-policy the two are the same
distribution, so their gap measures engine/trainer disagreement, not learning: a warning above ``warn``, a stop
above ``stop`` (mean |log pi_behav - log pi_train| per trained token, in nats)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

LIKELY_CAUSES = ("numeric precision (the engine's dtype or kernels differ from the trainer's: compare in float32)",
                 "the chat template or prompt formatting (the engine saw other prompt tokens than the trainer scores)",
                 "sampling settings (temperature, top-k/top-p or logits transforms applied to the engine's "
                 "log-probs but not to the training forward, or the other way round)",
                 "stale weights (the engine was not updated after the last optimizer step)")


class DriftError(RuntimeError):
    """The engine's log-probs disagree with the training forward beyond ``train.drift_guard.stop``."""


def mean_abs_drift(behavior_logp: Tensor, train_logp: Tensor, mask: Tensor) -> float:
    """(1/N) sum_t m_t |log pi_behav(y_t) - log pi_train(y_t)| over the N trained tokens (0 with none)."""
    mask = mask.float()
    return float(((behavior_logp.float() - train_logp.float()).abs() * mask).sum() / mask.sum().clamp(min=1))


def due(step_index: int, every: int) -> bool:
    """True at the first step (index 0) and every ``every`` steps after it; never with ``every=0``."""
    return every > 0 and step_index % every == 0


def check_drift(value: float, *, warn: float, stop: float, step: int, warn_fn: Callable[[str], None]) -> None:
    """Warn above ``warn``; raise DriftError naming the likely causes above ``stop``."""
    head = (f"step {step}: the rollout engine's behaviour log-probs differ from the training forward of the same "
            f"weights by {value:.4f} nats per token (mean |delta logp|)")
    if value > stop:
        causes = "; ".join(f"({i + 1}) {c}" for i, c in enumerate(LIKELY_CAUSES))
        raise DriftError(f"{head}, above train.drift_guard.stop={stop}; stopping before training on it. Likely causes: "
                         f"{causes}. Raise train.drift_guard.stop or set train.drift_guard.every=0 to train anyway.")
    if value > warn:
        warn_fn(f"{head}, above train.drift_guard.warn={warn}; check precision, chat template, sampling settings "
                "and weight sync (train.drift_guard)")
