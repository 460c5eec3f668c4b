"""PAPO (arXiv:2507.06448), text analogue: the implicit perception loss — maximise the KL between the
policy's prediction under the true prompt and under a corrupted prompt — plus the double entropy loss.

The registered ``papo`` component (policylab/annotate/perception.py) computes the corrupted-prompt
log-probs in its ``annotate`` hook (field ``papo_aug_logp``) and uses :class:`PerceptionKLPenalty` below
for the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import masked_mean
from policylab.algo.regularizers.divergence import kl_estimate
from policylab.algo.token_weights.vppo import top_tokens_per_row
from policylab.rollouts import PolicyOutputs, Rollouts


class PerceptionKLPenalty:
    """PAPO (arXiv:2507.06448, text analogue): −γ·KL_prcp(π_θ(·|q) ‖ π_old(·|masked q)) + double entropy loss.

    KL_prcp = k3 with the corrupted-prompt log-probs ``aug`` as reference. Optional clip of KL_prcp to
    [0, ``kl_clip``] and per-response top-``top_fraction`` token mask by KL. Double entropy:
    η_aug·(−aug) + η_ori·(−log π_θ) (the aug term carries no gradient: aug is computed once per batch).
    γ anneals linearly to ``gamma_end`` over ``annealing_ratio`` of ``total_steps`` (the run's
    train.steps, required with ``gamma_end``); the entropy terms scale by γ_t/γ_0. The step count moves
    in ``after_step``. With gamma 0 and eta_aug 0 the corrupted pass is not needed (VPPO's entropy penalty
    reuses this).
    """

    aug_field = "papo_aug_logp"

    def __init__(self, gamma: float = 0.01, eta_aug: float = 0.0, eta_ori: float = 0.0, kl_clip: float | None = None,
                 top_fraction: float | None = None, gamma_end: float | None = None, annealing_ratio: float = 1.0,
                 total_steps: int | None = None):
        self.gamma0, self.eta_aug, self.eta_ori, self.kl_clip, self.top_fraction = gamma, eta_aug, eta_ori, kl_clip, top_fraction
        self.gamma_end, self.annealing_ratio, self.total_steps = gamma_end, annealing_ratio, total_steps
        self.steps = 0

    @property
    def needs_aug(self) -> bool:
        return self.gamma0 != 0 or self.eta_aug != 0 or (self.gamma_end or 0) != 0

    @property
    def gamma(self) -> float:
        """γ_t at the current step."""
        if self.gamma_end is None:
            return self.gamma0
        if not self.total_steps:
            raise ValueError("papo gamma_end anneals over annealing_ratio of total_steps: set total_steps, or run it "
                             "in the loop, whose annotate pass takes the run's train.steps")
        horizon = max(1.0, self.annealing_ratio * self.total_steps)
        return self.gamma0 + (self.gamma_end - self.gamma0) * min(1.0, self.steps / horizon)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        device = out.logp.device
        mask = batch.completion_mask.to(device)
        gamma = self.gamma
        ratio = gamma / self.gamma0 if self.gamma0 else 1.0
        loss = self.eta_ori * ratio * (-out.logp)
        metrics = {"papo/gamma": torch.tensor(gamma), "papo/ori_entropy": masked_mean(-out.logp.detach(), mask)}
        if self.needs_aug:
            if self.aug_field not in batch.extras:
                raise ValueError(f"papo: rollouts.extras has no {self.aug_field}; its annotate(rollouts, ctx) must run first")
            aug = batch.extras[self.aug_field].to(device)
            kl = kl_estimate(out.logp, aug, "k3")
            if self.kl_clip is not None:
                kl = kl.clamp(0.0, self.kl_clip)
            if self.top_fraction is not None:
                kl = kl * top_tokens_per_row(kl.detach(), mask, self.top_fraction)
            loss = loss - gamma * kl + self.eta_aug * ratio * (-aug)
            metrics.update({"papo/kl_prcp": masked_mean(kl.detach(), mask), "papo/aug_entropy": masked_mean(-aug, mask)})
        return loss, metrics

    def after_step(self, metrics: dict | None = None) -> None:
        """One training step done: γ_t moves along its schedule."""
        self.steps += 1
