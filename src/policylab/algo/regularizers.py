"""Baseline regularizers: KL to a reference policy and the entropy bonus (advantages_rewards.md E1–E2;
objectives.md §1.1). Same contract as objectives: per-token loss [B,T] added before aggregation.

A regularizer that needs the reference model declares ``needs_reference(params) -> bool`` so the loop
loads the reference model only when some term uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives import masked_mean
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+", "abs")
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (E1).

    x = clamp(ref_logp - logp, -20, 20); k1 = -x; k2 = x^2/2; k3 = clamp(e^x - 1 - x, -10, 10); abs = |x|.
    "k1+"/"k3+": forward value of k1/k3, gradient of k2 (straight-through).
    """
    estimator = _ALIASES.get(estimator, estimator)
    x = (ref_logp - logp).clamp(-20.0, 20.0)
    k1 = -x
    k2 = 0.5 * x**2
    k3 = (torch.exp(x) - 1 - x).clamp(-10.0, 10.0)
    if estimator == "k1":
        return k1
    if estimator == "k2":
        return k2
    if estimator == "k3":
        return k3
    if estimator == "abs":
        return x.abs()
    if estimator in ("k1+", "k3+"):
        value = k1 if estimator == "k1+" else k3
        return value.detach() + k2 - k2.detach()
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)} (aliases {', '.join(_ALIASES)})")


class KLPenalty:
    """beta * KL_est(logp, ref_logp) as a loss term (E1 placement (b), GRPO style)."""

    def __init__(self, beta: float = 0.04, estimator: str = "k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), estimator)  # validate the name now, not mid-run
        self.beta = beta
        self.estimator = estimator

    def needs_reference(self) -> bool:
        return self.beta != 0

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        if self.beta == 0:
            return torch.zeros_like(out.logp), {}
        if batch.ref_logp is None:
            raise ValueError("the kl regularizer needs reference log-probs (rollouts.ref_logp)")
        kl = kl_estimate(out.logp, batch.ref_logp, self.estimator)
        return self.beta * kl, {"kl": masked_mean(kl.detach(), mask), "kl/beta": torch.tensor(self.beta)}


register("regularizer", "kl", spec="advantages_rewards.md E1; objectives.md §1.1")(KLPenalty)


def token_entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v (E2)."""
    logz = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return logz - (p * logits).sum(-1)


class EntropyBonus:
    """-c * H per token (E2); adaptive mode moves c toward a target entropy after each optimizer step.

    Adaptive (Skywork-OR1 / TRL): c <- clip(c + delta*(1 if H < target else -1), c_min, c_max) and the
    bonus applies only while H <= target.
    """

    def __init__(self, coef: float = 0.001, adaptive: bool = False, target: float = 0.2, delta: float = 0.005,
                 coef_min: float = 0.0, coef_max: float = 1.0):
        self.coef, self.adaptive, self.target, self.delta = coef, adaptive, target, delta
        self.coef_min, self.coef_max = coef_min, coef_max
        self._last_entropy: float | None = None

    needs_entropy_grad = True

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if out.entropy is None:
            raise ValueError("entropy regularizer needs PolicyOutputs.entropy")
        mask = batch.completion_mask
        mean_h = masked_mean(out.entropy.detach(), mask)
        self._last_entropy = float(mean_h)
        active = (not self.adaptive) or self._last_entropy <= self.target
        coef = self.coef if active else 0.0
        return -coef * out.entropy, {"entropy/coef": torch.tensor(coef)}

    def after_step(self, mean_entropy: float | None = None) -> None:
        """Adaptive update of the coefficient, once per optimizer step."""
        h = self._last_entropy if mean_entropy is None else mean_entropy
        if not self.adaptive or h is None:
            return
        direction = 1.0 if h < self.target else -1.0
        self.coef = min(self.coef_max, max(self.coef_min, self.coef + self.delta * direction))

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


register("regularizer", "entropy", spec="advantages_rewards.md E2")(EntropyBonus)
