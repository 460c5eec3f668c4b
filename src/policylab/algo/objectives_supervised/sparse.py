"""ReasonMaxxer (objectives.md §4.3): an advantage-signed loss only at the base model's high-entropy
"decision" tokens, with a KL anchor to the base model everywhere else. RL-free and offline: it trains on
a fixed set of base-model rollouts.

In the loop: the ``reasonmaxxer`` advantage gives A = clip((R - mean)/pstd) per problem; this objective's
``prepare`` computes the base entropies and, with ``offline=True``, freezes the first rollout batch (generated
by the policy before any update, i.e. the base model) as the training set, selects its mid-difficulty
problems, and hands that same set back at every later step (steps = epochs over the base rollouts).
"""

from __future__ import annotations

import logging
from dataclasses import fields

import torch
from torch import Tensor

from policylab.algo.objectives import masked_mean
from policylab.algo.regularizers import kl_estimate
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

log = logging.getLogger(__name__)

DECISION_OBJECTIVES = ("adv_ce", "delta_hinge", "correct_sft")


def decision_tokens(base_entropy: Tensor, mask: Tensor, correct: Tensor, tau_pos: float, tau_neg: float) -> Tensor:
    """[B,T] bool: trained positions whose BASE entropy is strictly above tau (tau_pos on correct rollouts,
    tau_neg on incorrect ones). A token at exactly tau is not a decision token."""
    tau = torch.where(correct, tau_pos, tau_neg).to(base_entropy.dtype)[:, None]
    return (base_entropy > tau) & (mask > 0)


def select_problems(rewards: Tensor, group: Tensor, *, max_problems: int = 50, threshold: float = 0.5) -> Tensor:
    """Group ids (as in ``group``) of the problems to train on: those with both correct and incorrect rollouts,
    closest to pass-rate 0.5 first, at most ``max_problems`` (§4.3 data selection)."""
    chosen = []
    for g in torch.unique(group):
        r = rewards[(group == g) & ~torch.isnan(rewards)]
        if r.numel() == 0:
            continue
        rate = float((r > threshold).float().mean())
        if 0 < rate < 1:
            chosen.append((abs(rate - 0.5), int(g)))
    chosen.sort(key=lambda item: item[0])  # stable: ties keep batch order
    return torch.tensor([g for _, g in chosen[:max_problems]], dtype=torch.long)


def decision_token_losses(logp: Tensor, base_logp: Tensor, adv: Tensor, *, objective: str, beta_neg: float,
                          margin: float) -> Tensor:
    """Per-token decision loss (§4.3), advantages [B,T] already clipped.

    adv_ce: A * CE = -A * logp, negative A scaled by beta_neg; delta_hinge (delta = logp - base_logp):
    relu(margin - delta)*|A| for A > 0, relu(delta + margin)*|A|*beta_neg for A < 0; correct_sft: -logp where A > 0.
    """
    if objective == "adv_ce":
        scale = torch.where(adv < 0, beta_neg, 1.0).to(logp.dtype)
        return -adv * logp * scale
    if objective == "delta_hinge":
        delta = logp - base_logp
        pos = torch.relu(margin - delta) * adv.abs()
        neg = torch.relu(delta + margin) * adv.abs() * beta_neg
        return torch.where(adv > 0, pos, torch.where(adv < 0, neg, torch.zeros_like(pos)))
    if objective == "correct_sft":
        return torch.where(adv > 0, -logp, torch.zeros_like(logp))
    raise ValueError(f"reasonmaxxer: decision_objective must be one of {DECISION_OBJECTIVES}, got {objective!r}")


class ReasonMaxxerObjective:
    """ReasonMaxxer, objectives.md §4.3 (``decision_objective="adv_ce"`` exact from the code).

    Decision tokens D_i = {t: base entropy > tau, A_i != 0}; anchor tokens K_i = {valid t: base entropy <= tau}.
    Per sequence (the code trains with batch 1): decision_i = sum_{D_i} l_t / |D_i| and
    kl_i = sum_{K_i} KL_t / |K_i|; L = mean_i (decision_i + kl_weight * kl_i). The per-token loss carries
    L_i/|D_i| and L_i/|K_i|, so the recipe MUST use ``aggregate: seq-mean-token-mean``.
    KL_t: the code uses the full-vocabulary KL(base || student); the training forward returns only the sampled
    token's log-prob, so we use the sampled-token estimate at the base model's own tokens (unbiased in value and
    gradient because the rollouts come from the base): ``kl_estimator="k3"`` r - 1 - log r with r = student/base
    (ours, non-negative) or ``"k1"`` log base - log student.
    ``margin`` (delta_hinge only) has no value in the spec; 0.5 is ours. Base log-probs = rollouts.ref_logp (the
    reference model is the base); base entropies from ``prepare`` (extras["base_entropy"]), else rollouts.entropy.
    Not done: LoRA (the paper trains a rank-32 adapter; here the full model), the curriculum by signal clarity,
    and the "trim fraction 0.8" of rollouts (unclear in the spec).
    Shared-test tags: T-ONPOL (supervised, not REINFORCE with batch.advantages at every token), T-ZEROADV (the KL
    anchor acts on every non-decision token, also of an equal-reward problem).
    """

    def __init__(self, *, tau_pos: float = 1.4, tau_neg: float = 1.4, kl_weight: float = 0.2, beta_neg: float = 1.0,
                 decision_objective: str = "adv_ce", margin: float = 0.5, kl_estimator: str = "k3",
                 offline: bool = True, max_problems: int = 50, correct_threshold: float = 0.5):
        if decision_objective not in DECISION_OBJECTIVES:
            raise ValueError(f"reasonmaxxer: decision_objective must be one of {DECISION_OBJECTIVES}, got {decision_objective!r}")
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"reasonmaxxer: kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
        self.tau_pos, self.tau_neg, self.kl_weight, self.beta_neg = tau_pos, tau_neg, kl_weight, beta_neg
        self.decision_objective, self.margin, self.kl_estimator = decision_objective, margin, kl_estimator
        self.offline, self.max_problems, self.correct_threshold = offline, max_problems, correct_threshold
        self.buffer: Rollouts | None = None

    def needs_reference(self) -> bool:
        return True

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if self.offline and self.buffer is not None:
            return self.buffer.with_(extras=dict(self.buffer.extras))
        if ctx.ref_model is None and ctx.step > 0:
            raise ValueError("reasonmaxxer needs the base model: the reference model is not loaded and the policy has moved")
        base = ctx.score(rollouts, model=ctx.ref_model if ctx.ref_model is not None else ctx.model)
        rollouts.extras["base_entropy"] = base.entropy.float()
        keep = select_problems(rollouts.rewards.float(), rollouts.group, max_problems=self.max_problems,
                               threshold=self.correct_threshold)
        if keep.numel() == 0:
            log.warning("reasonmaxxer: no problem in this batch has both correct and incorrect base rollouts; "
                        "all advantages are 0 and only the KL anchor trains (raise train.prompts_per_step or rollout.group_size)")
            selected = rollouts
        else:
            selected = rollouts.select(torch.isin(rollouts.group, keep))
        if self.offline:
            self.buffer = selected
        return selected

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        device = out.logp.device
        if batch.ref_logp is None:
            raise ValueError("reasonmaxxer needs base-model log-probs (rollouts.ref_logp from the reference model)")
        base_entropy = batch.extras.get("base_entropy", batch.entropy)
        if base_entropy is None:
            raise ValueError("reasonmaxxer needs base-model entropies (extras['base_entropy'] from prepare, or rollouts.entropy)")
        base_entropy, base_logp = base_entropy.to(device), batch.ref_logp.to(device)
        adv = batch.seq_advantages().to(device)
        correct = (torch.nan_to_num(batch.rewards.float(), nan=0.0) > self.correct_threshold).to(device)
        high = decision_tokens(base_entropy, mask, correct, self.tau_pos, self.tau_neg)
        decision = (high & (adv != 0)).float()
        anchor = mask * (~high).float()
        lengths = mask.sum(-1, keepdim=True)
        per_decision = lengths / decision.sum(-1, keepdim=True).clamp(min=1)
        per_anchor = lengths / anchor.sum(-1, keepdim=True).clamp(min=1)
        dec_loss = decision_token_losses(out.logp, base_logp, adv, objective=self.decision_objective,
                                         beta_neg=self.beta_neg, margin=self.margin)
        kl = kl_estimate(base_logp, out.logp, self.kl_estimator)  # x = logp - base_logp: KL(base || student) at base tokens
        loss = dec_loss * decision * per_decision + self.kl_weight * kl * anchor * per_anchor
        delta = (out.logp - base_logp).detach()
        metrics = {
            "reasonmaxxer/decision_frac": masked_mean(decision, mask),
            "reasonmaxxer/kl": masked_mean(kl.detach(), anchor),
            "reasonmaxxer/delta_logp_pos": masked_mean(delta, decision * (adv > 0)),
            "reasonmaxxer/delta_logp_neg": masked_mean(delta, decision * (adv < 0)),
        }
        return loss, metrics

    def state_dict(self) -> dict:
        if self.buffer is None:
            return {}
        return {"buffer": {f.name: getattr(self.buffer, f.name) for f in fields(Rollouts)}}

    def load_state_dict(self, state: dict) -> None:
        if "buffer" in state:
            self.buffer = Rollouts(**state["buffer"])


register("objective", "reasonmaxxer", spec="objectives.md §4.3", tags=("skip:T-ONPOL", "skip:T-ZEROADV"))(ReasonMaxxerObjective)
