"""Self-distillation losses: SDPO (arXiv:2601.20802) and SRPO (arXiv:2604.02288), pure math.

The teacher is the same network (an EMA copy by default) conditioned on a *reprompt*: the original prompt plus
a successful rollout of the same prompt. It scores the student's own completion tokens; the student is pulled
toward the teacher's log-probs on those tokens (sampled-token reverse KL). The teacher pass (reprompts, the
EMA copy, scoring) drives a model, so it lives with the registered objectives in ``policylab.annotate.teacher``;
it leaves per row ``teacher_logp`` [B,T], ``teacher_entropy`` [B,T] and which rows have a teacher. This module
has the losses and the routing/weighting arithmetic they read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import masked_mean, old_logp_of, ppo_clip_loss
from policylab.algo.objectives.sequence_level import part_scales
from policylab.rollouts import PolicyOutputs, Rollouts

ROUTE_GRPO, ROUTE_DISTILL, ROUTE_DROP = 0, 1, 2


def teacher_demonstrations(rewards: Tensor, group: Tensor, candidates: Tensor, *, success_threshold: float = 1.0,
                           exclude_self: bool = True) -> Tensor:
    """[B] index of the successful sibling whose text becomes row i's teacher context, -1 = none (SDPO).

    A row gets one only if it is a candidate and its prompt has a rollout with reward >= success_threshold
    (other than itself when ``exclude_self``, TRL's dont_reprompt_on_self_success). The first such row is used.
    """
    r = torch.nan_to_num(rewards.float(), nan=float("-inf"))
    success = r >= success_threshold
    demo = torch.full((len(r),), -1, dtype=torch.long)
    for i in candidates.nonzero().flatten().tolist():
        ok = success & (group == group[i])
        if exclude_self:
            ok[i] = False
        found = ok.nonzero().flatten()
        if found.numel():
            demo[i] = found[0]
    return demo


def sdpo_token_losses(logp: Tensor, teacher_logp: Tensor, old_logp: Tensor, is_clip: float = 2.0) -> Tensor:
    """Sampled-token reverse KL (SDPO): l_t = sg(logp_s - logp_T) * logp_s * sg(min(pi_s/pi_old, is_clip))."""
    is_weight = torch.exp((logp - old_logp).clamp(-20.0, 20.0)).clamp(max=is_clip).detach()
    return (logp - teacher_logp).detach() * logp * is_weight


def entropy_weights(teacher_entropy: Tensor, token_mask: Tensor, temperature: float) -> Tensor:
    """w = exp(-H^T / tau_H), normalised so its mean over ``token_mask`` tokens is 1 (SRPO, reconstructed)."""
    w = torch.exp(-teacher_entropy / temperature) * token_mask
    mean = w.sum() / token_mask.sum().clamp(min=1)
    return torch.where(mean > 0, w / mean.clamp(min=1e-30), w)


def failed_rows(rewards: Tensor, success_threshold: float) -> Tensor:
    """[B] bool: reward < success_threshold (a NaN reward is not a failure: it routes to GRPO, advantage 0)."""
    return torch.nan_to_num(rewards.float(), nan=float("inf")) < success_threshold


def srpo_routes(rewards: Tensor, has_teacher: Tensor, *, success_threshold: float, no_teacher: str) -> Tensor:
    """[B] SRPO route: 0 = GRPO (correct rows, and failed rows without a teacher when no_teacher="grpo"),
    1 = distill (failed rows with a teacher context), 2 = dropped (failed without a teacher, no_teacher="drop")."""
    failed = failed_rows(rewards, success_threshold)
    route = torch.full((rewards.shape[0],), ROUTE_GRPO, dtype=torch.long)
    route[failed & has_teacher] = ROUTE_DISTILL
    if no_teacher == "drop":
        route[failed & ~has_teacher] = ROUTE_DROP
    return route


class SdpoLoss:
    """SDPO's loss (Hubotter et al. 2026, arXiv:2601.20802; TRL experimental SDPO); the registered objective
    ``sdpo`` (policylab.annotate.teacher) adds the teacher pass.

    In words: on rows that have a teacher context, each sampled token's log-prob is pulled toward the teacher's
    log-prob of the same token (sampled-token reverse KL, importance-clipped):
    l_t = sg(logp_s - logp_T) * logp_s * sg(min(pi_s/pi_old, is_clip)) (``loss_mode="sampled_token"``).
    Total: (1 - distill_weight) * PPO-clip(A) + distill_weight * distillation, default distill_weight = 1.
    ``full_logits`` / ``topk_logits`` modes need the student's and teacher's full distributions, which
    PolicyOutputs does not carry; they are not available. Without teacher fields (a bare call) no row is
    distilled: the loss is (1 - distill_weight) * PPO-clip.
    """

    def __init__(self, *, distill_weight: float = 1.0, loss_mode: str = "sampled_token", is_clip: float = 2.0,
                 eps_low: float = 0.2, eps_high: float = 0.2):
        if loss_mode != "sampled_token":
            raise ValueError(f"sdpo: loss_mode {loss_mode!r} needs full vocabulary distributions, which the training forward "
                             "does not return; only 'sampled_token' is available")
        if not 0 <= distill_weight <= 1:
            raise ValueError(f"sdpo: distill_weight must be in [0, 1], got {distill_weight}")
        self.distill_weight, self.is_clip, self.eps_low, self.eps_high = distill_weight, is_clip, eps_low, eps_high

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        device = out.logp.device
        loss = 0.0 * out.logp  # keeps the graph when no row is distilled
        metrics: dict = {}
        if self.distill_weight < 1:
            policy_loss, metrics = ppo_clip_loss(out, batch, eps_low=self.eps_low, eps_high=self.eps_high)
            loss = loss + (1 - self.distill_weight) * policy_loss
        distilled = torch.zeros(batch.batch_size, dtype=torch.bool, device=device)
        if "teacher_logp" in batch.extras:
            teacher_logp = batch.extras["teacher_logp"].to(device)
            distilled = batch.extras["distill_mask"].to(device)
            distill = sdpo_token_losses(out.logp, teacher_logp, old_logp_of(out, batch).to(device), self.is_clip)
            loss = loss + self.distill_weight * distill * distilled[:, None]
            metrics["sdpo/student_minus_teacher"] = masked_mean(out.logp.detach() - teacher_logp, mask * distilled[:, None])
        metrics["sdpo/distilled_frac"] = distilled.float().mean() if distilled.numel() else torch.tensor(0.0)
        return loss * mask, metrics


class SrpoLoss:
    """SRPO's loss (Li et al. 2026, arXiv:2604.02288; routing exact from the abstract; weight form and defaults
    reconstructed); the registered objective ``srpo`` (policylab.annotate.teacher) adds the teacher pass.

    In words: correct rows get GRPO's PPO-clip update, failed rows with a successful sibling get SDPO's
    sampled-token distillation weighted by the teacher's confidence, and each route is a token-mean over its own
    tokens: L = token-mean_{C + fallback}(PPO) + distill_coef * token-mean_F(w * l_SDPO), with
    w = exp(-H^T/entropy_temperature) normalised to mean 1 over distilled tokens. Failed rows without a teacher:
    ``no_teacher`` = "grpo" (default) or "drop". The batch pass stores per-row scales n_all/n_route
    (:func:`route_fields`) so that ONE token-mean over the batch gives that sum exactly: the recipe's aggregation
    must be ``token-mean`` (``aggregates``). Without the batch pass every row routes to GRPO: SRPO == PPO-clip,
    so the shared tests apply.
    """

    aggregates = ("token-mean",)  # the route scales are written for this aggregation

    def __init__(self, *, success_threshold: float = 1.0, distill_coef: float = 1.0, entropy_temperature: float = 1.0,
                 no_teacher: str = "grpo", is_clip: float = 2.0, eps_low: float = 0.2, eps_high: float = 0.28):
        if no_teacher not in ("grpo", "drop"):
            raise ValueError(f"srpo: no_teacher must be 'grpo' or 'drop', got {no_teacher!r}")
        if entropy_temperature <= 0:
            raise ValueError(f"srpo: entropy_temperature must be > 0, got {entropy_temperature}")
        self.success_threshold, self.distill_coef, self.entropy_temperature = success_threshold, distill_coef, entropy_temperature
        self.no_teacher, self.is_clip, self.eps_low, self.eps_high = no_teacher, is_clip, eps_low, eps_high

    def route_fields(self, rollouts: Rollouts, teacher_entropy: Tensor, has_teacher: Tensor) -> dict[str, Tensor]:
        """srpo_route [B], srpo_weight [B,T] (teacher-confidence weights on distilled tokens) and srpo_scale [B]
        (n_all/n_route token counts) of a rollout batch whose teacher pass found ``has_teacher`` rows."""
        route = srpo_routes(rollouts.rewards, has_teacher, success_threshold=self.success_threshold,
                            no_teacher=self.no_teacher)
        mask = rollouts.completion_mask
        distill_tokens = mask * (route == ROUTE_DISTILL)[:, None]
        return {
            "srpo_route": route,
            "srpo_weight": entropy_weights(teacher_entropy, distill_tokens, self.entropy_temperature),
            "srpo_scale": part_scales(mask, [route == ROUTE_GRPO, route == ROUTE_DISTILL]),
        }

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        device = out.logp.device
        ppo, metrics = ppo_clip_loss(out, batch, eps_low=self.eps_low, eps_high=self.eps_high)
        route = batch.extras.get("srpo_route")
        if route is None:  # a bare call: nobody has a teacher
            return ppo, {**metrics, "srpo/grpo_frac": torch.tensor(1.0), "srpo/distill_frac": torch.tensor(0.0)}
        route = route.to(device)
        scale = batch.extras["srpo_scale"].to(device)[:, None]
        teacher_logp = batch.extras["teacher_logp"].to(device)
        weight = batch.extras["srpo_weight"].to(device)
        distill = sdpo_token_losses(out.logp, teacher_logp, old_logp_of(out, batch).to(device), self.is_clip)
        loss = torch.where((route == ROUTE_GRPO)[:, None], ppo, torch.zeros_like(ppo))
        loss = loss + torch.where((route == ROUTE_DISTILL)[:, None], self.distill_coef * weight * distill, torch.zeros_like(ppo))
        d_tok = mask * (route == ROUTE_DISTILL)[:, None]
        metrics.update({
            "srpo/grpo_frac": (route == ROUTE_GRPO).float().mean(),
            "srpo/distill_frac": (route == ROUTE_DISTILL).float().mean(),
            "srpo/dropped_frac": (route == ROUTE_DROP).float().mean(),
            "srpo/teacher_entropy": masked_mean(batch.extras["teacher_entropy"].to(device), d_tok),
            "srpo/distill_loss": masked_mean(distill.detach(), d_tok),
        })
        return loss * scale * mask, metrics
