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


def adaptive_kl_beta(beta: float, kl: float, target: float, n_steps: float, horizon: float) -> float:
    """Adaptive KL controller (Ziegler et al.; E1): e = clip(KL/KL_target - 1, -0.2, 0.2), beta <- beta*(1 + e*n/H).

    ``n_steps`` counts samples since the last update and ``horizon`` is in samples (verl AdaptiveKLController).
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


class KLPenalty:
    """beta * KL_est(logp, ref_logp) as a loss term (E1 placement (b), GRPO style).

    ``controller``: "fixed" (default) or "adaptive": after each step beta moves by :func:`adaptive_kl_beta`
    with the token-mean KL and the number of sequences seen since the previous step (our choice: the
    spec's controller is verl's KL-in-reward one; here it drives the KL-loss coefficient).
    """

    def __init__(self, beta: float = 0.04, estimator: str = "k3", controller: str = "fixed",
                 target_kl: float = 0.1, horizon: float = 10000):
        kl_estimate(torch.zeros(1), torch.zeros(1), estimator)  # validate the name now, not mid-run
        if controller not in ("fixed", "adaptive"):
            raise ValueError(f"kl controller must be 'fixed' or 'adaptive', got {controller!r}")
        if controller == "adaptive":
            adaptive_kl_beta(beta, 0.0, target_kl, 0, horizon)  # validate target/horizon now
        self.beta = beta
        self.estimator = estimator
        self.controller, self.target_kl, self.horizon = controller, target_kl, horizon
        self._kl_sum = self._tokens = self._seqs = 0.0

    def needs_reference(self) -> bool:
        return self.beta != 0

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        if self.beta == 0:
            return torch.zeros_like(out.logp), {}
        if batch.ref_logp is None:
            raise ValueError("the kl regularizer needs reference log-probs (rollouts.ref_logp)")
        kl = kl_estimate(out.logp, batch.ref_logp, self.estimator)
        if self.controller == "adaptive":
            self._kl_sum += float((kl.detach() * mask).sum())
            self._tokens += float(mask.sum())
            self._seqs += float((mask.sum(-1) > 0).sum())
        return self.beta * kl, {"kl": masked_mean(kl.detach(), mask), "kl/beta": torch.tensor(self.beta)}

    def after_step(self, metrics: dict | None = None) -> None:
        """Adaptive controller update, once per step, from the KL seen since the previous step."""
        if self.controller != "adaptive" or self._tokens == 0:
            return
        self.beta = adaptive_kl_beta(self.beta, self._kl_sum / self._tokens, self.target_kl, self._seqs, self.horizon)
        self._kl_sum = self._tokens = self._seqs = 0.0

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


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

    def after_step(self, metrics: dict | float | None = None) -> None:
        """Adaptive update of the coefficient, once per step.

        ``metrics`` is the loop's step metrics (train/context.py: ``after_step(metrics: dict)``); its
        "entropy" (the step's mean token entropy) is used when present, else the last seen mean. A bare
        number is taken as the mean entropy.
        """
        if isinstance(metrics, dict):
            metrics = metrics.get("entropy")
        h = self._last_entropy if metrics is None else float(metrics)
        if not self.adaptive or h is None:
            return
        direction = 1.0 if h < self.target else -1.0
        self.coef = min(self.coef_max, max(self.coef_min, self.coef + self.delta * direction))

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


register("regularizer", "entropy", spec="advantages_rewards.md E2")(EntropyBonus)
