"""Divergence from another policy: KL estimators and the KL regularizer with its adaptive controller,
the accuracy-conditioned KL coefficient (FG-ExPO), and the f-divergence generators of DPH-RL.

A regularizer that reads the reference policy's log-probs declares ``requires = ("ref_logp",)``; the
loader then loads the reference model and adds the ``reference_logp`` annotator (policylab/annotate/scoring.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.group_stats import correctness
from policylab.algo.objectives.policy_gradient import masked_mean
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+", "abs")
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def check_log_ratio_clamp(log_ratio_clamp: float | None) -> None:
    """A clamp is None (the reference default per estimator) or a positive bound (math.inf: no clamp)."""
    if log_ratio_clamp is not None and not float(log_ratio_clamp) > 0:
        raise ValueError(f"KL log_ratio_clamp must be None (reference default) or > 0 (inf = off), got {log_ratio_clamp!r}")


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", *, log_ratio_clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, "Approximating KL
    divergence", 2020; the k1/k2/k3 names of GRPO, arXiv:2402.03300 eq. 4).

    x = ref_logp - logp; k1 = -x; k2 = x^2/2; k3 = clamp(e^x - 1 - x, -10, 10); abs = |x|.
    "k1+"/"k3+": forward value of k1/k3, gradient of k2 (straight-through).
    ``log_ratio_clamp`` bounds x to [-c, c] before the estimator. None (default) does what the references do
    (verl ``kl_penalty``, Schulman's note): only k3 clamps x, at 20, because only k3 exponentiates it; k1, k2 and
    abs are unclamped, so k2 keeps its gradient on the tokens furthest from the reference (and "k3+" takes its
    forward value from clamped k3, its gradient from unclamped k2). A number applies that clamp to the chosen
    estimator (math.inf = no clamp, also for k3).
    """
    estimator = _ALIASES.get(estimator, estimator)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)} (aliases {', '.join(_ALIASES)})")
    check_log_ratio_clamp(log_ratio_clamp)
    raw = ref_logp - logp
    bound = float(log_ratio_clamp) if log_ratio_clamp is not None else None

    def clamped(default: float) -> Tensor:
        c = default if bound is None else bound
        return raw if c == math.inf else raw.clamp(-c, c)

    x = clamped(math.inf)  # k1, k2, abs and the k2 gradient of "+": unclamped unless asked
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x**2
    if estimator == "abs":
        return x.abs()
    xk3 = clamped(20.0)
    k3 = (torch.exp(xk3) - 1 - xk3).clamp(-10.0, 10.0)
    if estimator == "k3":
        return k3
    value = -x if estimator == "k1+" else k3
    k2 = 0.5 * x**2
    return value.detach() + k2 - k2.detach()


def adaptive_kl_beta(beta: float, kl: float, target: float, n_steps: float, horizon: float) -> float:
    """Adaptive KL controller (Ziegler et al., arXiv:1909.08593): e = clip(KL/KL_target - 1, -0.2, 0.2),
    beta <- beta*(1 + e*n/H).

    ``n_steps`` counts samples since the last update and ``horizon`` is in samples (verl AdaptiveKLController).
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


@register("regularizer", "kl", spec="arXiv:2402.03300 §4.1 eq. 4 (k3 KL loss); arXiv:1909.08593 (adaptive controller)")
class KLPenalty:
    """KL to the reference policy as a loss term (GRPO, arXiv:2402.03300 eq. 4): beta times the per-token
    estimate of KL(pi_theta || pi_ref) from the sampled tokens (k3 by default: e^x - 1 - x with
    x = log pi_ref - log pi_theta).

    ``controller``: "fixed" (default) or "adaptive" (Ziegler et al., arXiv:1909.08593): after each step beta
    moves by :func:`adaptive_kl_beta` with the token-mean KL and the number of sequences seen since the
    previous step (our choice: verl's controller drives the KL-in-reward coefficient; here it drives the
    KL-loss coefficient). ``log_ratio_clamp``: see :func:`kl_estimate` (default: only k3 clamps, as in verl).
    Reads ``ref_logp`` unless beta is 0.
    """

    def __init__(self, beta: float = 0.04, estimator: str = "k3", controller: str = "fixed",
                 target_kl: float = 0.1, horizon: float = 10000, log_ratio_clamp: float | None = None):
        kl_estimate(torch.zeros(1), torch.zeros(1), estimator, log_ratio_clamp=log_ratio_clamp)  # validate now, not mid-run
        if controller not in ("fixed", "adaptive"):
            raise ValueError(f"kl controller must be 'fixed' or 'adaptive', got {controller!r}")
        if controller == "adaptive":
            adaptive_kl_beta(beta, 0.0, target_kl, 0, horizon)  # validate target/horizon now
        self.beta = beta
        self.estimator, self.log_ratio_clamp = estimator, log_ratio_clamp
        self.controller, self.target_kl, self.horizon = controller, target_kl, horizon
        self._kl_sum = self._tokens = self._seqs = 0.0

    def requires(self) -> tuple[str, ...]:
        return ("ref_logp",) if self.beta != 0 else ()

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        if self.beta == 0:
            return torch.zeros_like(out.logp), {}
        if batch.ref_logp is None:
            raise ValueError("the kl regularizer needs reference log-probs (rollouts.ref_logp)")
        kl = kl_estimate(out.logp, batch.ref_logp, self.estimator, log_ratio_clamp=self.log_ratio_clamp)
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


# -- f-divergences on samples of another policy (DPH-RL, arXiv:2509.07430) -----------------------------------


def _ratio_log(logp: Tensor, logp0: Tensor) -> Tensor:
    return (logp - logp0).clamp(-20.0, 20.0)


def forward_kl_f(logp: Tensor, logp0: Tensor) -> Tensor:
    """KL(π0‖π_θ) per π0-sampled token, k3 form with roles swapped: u − log u − 1, u = π_θ/π0 (clamped as k3)."""
    d = _ratio_log(logp, logp0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def js_f(logp: Tensor, logp0: Tensor) -> Tensor:
    """JS generator f(u) = u log u − (u + 1) log((u + 1)/2) (``js_low_var``)."""
    d = _ratio_log(logp, logp0)
    u = torch.exp(d)
    return u * d - (u + 1) * torch.log((u + 1) / 2)


def alpha_f(logp: Tensor, logp0: Tensor, alpha: float = 0.2) -> Tensor:
    """α-divergence generator f(u) = (u^{1−α} − (1−α)u − α)/(α(α − 1)), α ∈ (0, 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha divergence needs alpha in (0, 1), got {alpha}")
    u = torch.exp(_ratio_log(logp, logp0))
    return (u ** (1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))


DIVERGENCES = {"forward_kl": forward_kl_f, "js": js_f, "alpha": alpha_f}


def f_divergence(logp: Tensor, logp0: Tensor, divergence: str, alpha: float = 0.2) -> Tensor:
    """The per-token generator f(π_θ/π0) named ``divergence`` (one of :data:`DIVERGENCES`)."""
    if divergence == "alpha":
        return alpha_f(logp, logp0, alpha)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    return DIVERGENCES[divergence](logp, logp0)


# -- FG-ExPO accuracy-conditioned KL (arXiv:2605.11403) -------------------------------------------------------

AKL_ACCURACY = declare_field(
    "akl_batch_accuracy", per_row=False, shape="scalar", dtype="float", owner="regularizer 'fg_expo_akl'",
    doc="mean correctness of the whole rollout batch (before micro-batching), which sets the AKL coefficient")


def akl_beta(accuracy: float, *, beta_min: float = 0.0, beta_max: float = 0.002, center: float = 0.5, kappa: float = 10.0) -> float:
    """β_t = β_min + (β_max − β_min)·sigmoid(κ·(acc_t − a_0)): loose KL when failing, tight when succeeding."""
    return beta_min + (beta_max - beta_min) / (1.0 + math.exp(-kappa * (accuracy - center)))


@register("regularizer", "fg_expo_akl", spec="arXiv:2605.11403 (adaptive KL; reconstructed from the abstract)")
class AccuracyConditionedKL:
    """FG-ExPO AKL (arXiv:2605.11403): β_t·KL_est(π_θ‖π_ref) with β_t = β_min + (β_max − β_min)·
    sigmoid(κ·(acc_t − a_0)), acc_t the mean correctness of the whole batch's rollouts.

    ``annotate`` (no model) records acc_t as the per-batch field ``akl_batch_accuracy``, so every
    micro-batch uses the whole batch's accuracy. Reconstructed: β_min 0, β_max = 2·β_0 with β_0 = 0.001,
    a_0 = 0.5, κ = 10 are our defaults. Reads ``ref_logp`` unless β_max is 0.
    """

    provides = ("akl_batch_accuracy",)

    def __init__(self, beta_min: float = 0.0, beta_max: float = 0.002, center: float = 0.5, kappa: float = 10.0,
                 estimator: str = "k3", log_ratio_clamp: float | None = None):
        if beta_max < beta_min:
            raise ValueError(f"fg_expo_akl needs beta_max >= beta_min, got {beta_max} < {beta_min}")
        kl_estimate(torch.zeros(1), torch.zeros(1), estimator, log_ratio_clamp=log_ratio_clamp)  # validate now
        self.beta_min, self.beta_max, self.center, self.kappa, self.estimator = beta_min, beta_max, center, kappa, estimator
        self.log_ratio_clamp = log_ratio_clamp

    def requires(self) -> tuple[str, ...]:
        return ("rewards", "akl_batch_accuracy") + (("ref_logp",) if self.beta_max > 0 else ())

    def annotate(self, rollouts: Rollouts, ctx=None) -> dict:
        accuracy = float(correctness(rollouts).mean()) if rollouts.batch_size else 0.0
        return {"akl_batch_accuracy": accuracy}

    def beta(self, accuracy: float) -> float:
        return akl_beta(accuracy, beta_min=self.beta_min, beta_max=self.beta_max, center=self.center, kappa=self.kappa)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if "akl_batch_accuracy" not in batch.extras:
            raise ValueError("fg_expo_akl: rollouts.extras has no akl_batch_accuracy; its annotate(rollouts, ctx) must run first")
        accuracy = float(batch.extras["akl_batch_accuracy"])
        beta = self.beta(accuracy)
        if beta == 0:
            return torch.zeros_like(out.logp), {"akl/beta": torch.tensor(0.0)}
        if batch.ref_logp is None:
            raise ValueError("fg_expo_akl needs reference log-probs (rollouts.ref_logp)")
        kl = kl_estimate(out.logp, batch.ref_logp.to(out.logp.device), self.estimator, log_ratio_clamp=self.log_ratio_clamp)
        mask = batch.completion_mask.to(out.logp.device)
        return beta * kl, {"akl/beta": torch.tensor(beta), "akl/batch_accuracy": torch.tensor(accuracy),
                           "kl": masked_mean(kl.detach(), mask)}
