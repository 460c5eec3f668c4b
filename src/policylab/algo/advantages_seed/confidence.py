"""Advantages that read the policy's own confidence: ProGRPO/ARM (B6) and CAPO calibration (B10).

Both use sequence log-probs of the policy that produced the batch (``old_logp``, else ``behavior_logp``);
their ``prepare`` hooks fill what the batch lacks with ``ctx.score`` (a no-grad forward pass).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policylab.algo.advantages import grpo_advantage
from policylab.algo.advantages_seed.baselines import first_row_of_each_group
from policylab.algo.advantages_seed.common import masked_row_mean, require_extra, rewards_of, sequence_logp
from policylab.algo.group_stats import group_index, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts

COMPLETION_LOGP = "confidence/completion_logp"  # [B,T] filled by prepare when the batch has no old/behaviour log-probs


def completion_logp(rollouts: Rollouts, who: str) -> Tensor:
    logp = sequence_logp(rollouts)
    if logp is None:
        logp = require_extra(rollouts, COMPLETION_LOGP, who, "old/behaviour log-probs, or its prepare hook with ctx.score")
    return logp.float()


def fill_completion_logp(rollouts: Rollouts, ctx, who: str) -> Rollouts:
    """Score the completions under the current (pre-update) policy when the batch carries no log-probs."""
    if sequence_logp(rollouts) is not None or COMPLETION_LOGP in rollouts.extras:
        return rollouts
    if getattr(ctx, "score", None) is None:
        raise ValueError(f"{who} needs old/behaviour log-probs or ctx.score to compute them")
    extras = dict(rollouts.extras)
    extras[COMPLETION_LOGP] = ctx.score(rollouts).logp.detach().float()
    return rollouts.with_(extras=extras)


# --------------------------------------------------------------------------------------------------
# B6 ProGRPO / ARM


def prompt_as_completion(rollouts: Rollouts, rows: Tensor) -> Rollouts:
    """Rollouts whose 'completion' is prompt tokens 2..|q| of the given rows (first prompt token as context),
    so ``ctx.score`` yields log pi(q_t | q_<t) for t >= 2."""
    tokens = [rollouts.prompt_ids[i][rollouts.prompt_mask[i] > 0] for i in rows.tolist()]
    width = max([t.numel() - 1 for t in tokens] + [1])
    k = len(tokens)
    first = torch.zeros(k, 1, dtype=torch.long)
    rest = torch.zeros(k, width, dtype=torch.long)
    mask = torch.zeros(k, width)
    for j, t in enumerate(tokens):
        if t.numel():
            first[j, 0] = t[0]
        rest[j, : max(t.numel() - 1, 0)] = t[1:]
        mask[j, : max(t.numel() - 1, 0)] = 1.0
    return Rollouts(prompt_ids=first, prompt_mask=torch.ones(k, 1), completion_ids=rest, completion_mask=mask,
                    group=torch.arange(k), truncated=torch.zeros(k, dtype=torch.bool))


def low_probability_confidence(token_logp: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """c(o|q) of B6 [B]: mean of the k = ceil(fraction·L_i) smallest valid token log-probs; L_i = 0 gives 0."""
    out = torch.zeros(token_logp.shape[0])
    for i in range(token_logp.shape[0]):
        values = token_logp[i][mask[i] > 0]
        if values.numel():
            k = max(1, math.ceil(fraction * values.numel()))
            out[i] = values.sort().values[:k].mean()
    return out


def progrpo_shift(adv: Tensor, rewards: Tensor, group: Tensor, prompt_conf: Tensor, answer_conf: Tensor, lengths: Tensor,
                  *, alpha: float, apply_to: str = "correct", shift_clip: float | None = None,
                  correct_threshold: float = 0.5) -> Tensor:
    """B6: Ã_i = A_i + alpha·(c(q) - c(o_i|q)) in groups with a correct response, else A_i.

    ``apply_to``: "correct" (default) shifts correct responses only, "all" every response of such groups;
    ``shift_clip`` bounds the shift to [-delta, delta]; empty responses get no shift.
    """
    if apply_to not in ("correct", "all"):
        raise ValueError(f"progrpo apply_to must be 'correct' or 'all', got {apply_to!r}")
    idx, k = group_index(group)
    correct = ~torch.isnan(rewards) & (rewards > correct_threshold)
    group_has_correct = torch.zeros(k, dtype=torch.bool).index_put_((idx,), correct, accumulate=True)[idx]
    shift = alpha * (prompt_conf - answer_conf)
    if shift_clip is not None:
        shift = shift.clamp(-shift_clip, shift_clip)
    target = correct if apply_to == "correct" else ~torch.isnan(rewards)
    apply = group_has_correct & target & (lengths > 0)
    return torch.where(apply, adv + shift, adv)


PROMPT_CONFIDENCE = "progrpo/prompt_confidence"


@register("advantage", "progrpo", spec="advantages_rewards.md B6 (reconstructed)")
class ProGRPOAdvantage:
    """ProGRPO / ARM (B6, reconstructed): GRPO advantage plus alpha·(c(q) - c(o|q)) for correct responses.

    c(q) = mean log pi_old(q_t|q_<t) over prompt tokens 2..|q| (= -log PPL(q)), computed once per prompt by
    ``prepare`` with ``ctx.score``; c(o|q) = mean of the ceil(low_fraction·L) lowest token log-probs of the
    response. Our choices (the paper's definitions were not recovered): these c(.) definitions, alpha = 0.1,
    low_fraction = 0.2, apply_to = "correct", no shift clip, correct = reward > 0.5.
    """

    def __init__(self, alpha: float = 0.1, low_fraction: float = 0.2, apply_to: str = "correct",
                 shift_clip: float | None = None, correct_threshold: float = 0.5, eps: float = 1e-6):
        if not 0 < low_fraction <= 1:
            raise ValueError(f"progrpo low_fraction must be in (0, 1], got {low_fraction}")
        if apply_to not in ("correct", "all"):
            raise ValueError(f"progrpo apply_to must be 'correct' or 'all', got {apply_to!r}")
        self.alpha, self.low_fraction, self.apply_to = alpha, low_fraction, apply_to
        self.shift_clip, self.correct_threshold, self.eps = shift_clip, correct_threshold, eps
        self.last_metrics: dict[str, float] = {}

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if getattr(ctx, "score", None) is None:
            raise ValueError("progrpo needs ctx.score to compute the prompt log-likelihood c(q)")
        idx, first = first_row_of_each_group(rollouts.group)
        prompts = prompt_as_completion(rollouts, first)
        if prompts.completion_mask.sum() > 0:
            per_prompt = masked_row_mean(ctx.score(prompts).logp.detach().float(), prompts.completion_mask)
        else:  # every prompt is one token long: c(q) = 0
            per_prompt = torch.zeros(first.numel())
        extras = dict(rollouts.extras)
        extras[PROMPT_CONFIDENCE] = per_prompt[idx]
        return fill_completion_logp(rollouts.with_(extras=extras), ctx, "progrpo")

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "progrpo")
        prompt_conf = require_extra(rollouts, PROMPT_CONFIDENCE, "progrpo", "written by its prepare hook").float()
        mask = rollouts.completion_mask
        answer_conf = low_probability_confidence(completion_logp(rollouts, "progrpo"), mask, self.low_fraction)
        adv = grpo_advantage(rollouts, eps=self.eps)
        out = progrpo_shift(adv, r, rollouts.group, prompt_conf, answer_conf, rollouts.lengths, alpha=self.alpha,
                            apply_to=self.apply_to, shift_clip=self.shift_clip, correct_threshold=self.correct_threshold)
        shifted = out != adv
        self.last_metrics = {"progrpo/prompt_confidence": float(prompt_conf.mean()) if prompt_conf.numel() else 0.0,
                             "progrpo/mean_shift": float((out - adv)[shifted].mean()) if shifted.any() else 0.0}
        return out


# --------------------------------------------------------------------------------------------------
# B10 CAPO (calibration)


def capo_pairwise_advantages(confidence: Tensor, correct: Tensor, usable: Tensor, group: Tensor, tau: float) -> Tensor:
    """B10: negative gradient of the logistic AUC surrogate, scaled so equal confidences give +-1.

    Per group, correct i: A_i = (2/|W|) sum_{j in W} sigmoid((s_j - s_i)/tau); incorrect j:
    A_j = -(2/|C|) sum_{i in C} sigmoid((s_j - s_i)/tau). A group without both classes gets 0.
    Only ``usable`` rows (reward present, at least one token) take part.
    """
    adv = torch.zeros(confidence.shape[0])
    idx, k = group_index(group)
    for g in range(k):
        rows = (idx == g) & usable
        pos, neg = (rows & correct).nonzero().flatten(), (rows & ~correct).nonzero().flatten()
        if pos.numel() == 0 or neg.numel() == 0:
            continue
        pair = torch.sigmoid((confidence[neg][None, :] - confidence[pos][:, None]) / tau)  # [|C|, |W|]
        adv[pos] = 2 * pair.sum(1) / neg.numel()
        adv[neg] = -2 * pair.sum(0) / pos.numel()
    return adv


def capo_noise_mask(ref_confidence: Tensor, correct: Tensor, usable: Tensor, group: Tensor, q: float) -> Tensor:
    """[B] True where B10's noise rule zeroes the advantage: a correct answer the reference finds unlikely
    (s_ref below the group's q-quantile, a "lucky guess") or an incorrect one it finds likely (above 1-q)."""
    noisy = torch.zeros(ref_confidence.shape[0], dtype=torch.bool)
    idx, k = group_index(group)
    for g in range(k):
        rows = ((idx == g) & usable).nonzero().flatten()
        if rows.numel() < 2:
            continue
        s = ref_confidence[rows].double()
        low, high = torch.quantile(s, q), torch.quantile(s, 1 - q)
        noisy[rows] = (correct[rows] & (s < low)) | (~correct[rows] & (s > high))
    return noisy


def confidence_auc(confidence: Tensor, correct: Tensor) -> float:
    """ROC-AUC of confidence for separating correct from incorrect (ties count 1/2); 0.5 without both classes."""
    pos, neg = confidence[correct], confidence[~correct]
    if pos.numel() == 0 or neg.numel() == 0:
        return 0.5
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@register("advantage", "capo_calibration", spec="advantages_rewards.md B10 (reconstructed); data_agents_eval.md E3")
class CAPOCalibrationAdvantage:
    """CAPO calibration (B10, reconstructed): logistic-AUC pairwise advantages on confidence s = mean log pi_old.

    Correct = reward > ``correct_threshold`` (0.5). With ``mask_noise`` the reference model is loaded
    (``needs_reference``) and s_ref = mean log pi_ref flags noisy samples by the group quantile
    ``noise_quantile``; their advantage is set to 0 after the pairwise sums (B10's rule; E3 instead drops
    their pairs). Our choices: tau = 1, q = 0.1, the ±1 scaling, the masking rule.
    """

    def __init__(self, tau: float = 1.0, noise_quantile: float = 0.1, mask_noise: bool = True, correct_threshold: float = 0.5):
        if tau <= 0:
            raise ValueError(f"capo_calibration tau must be > 0, got {tau}")
        if not 0 <= noise_quantile < 0.5:
            raise ValueError(f"capo_calibration noise_quantile must be in [0, 0.5), got {noise_quantile}")
        self.tau, self.noise_quantile, self.mask_noise = tau, noise_quantile, mask_noise
        self.correct_threshold = correct_threshold
        self.last_metrics: dict[str, float] = {}

    def needs_reference(self) -> bool:
        return self.mask_noise

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        return fill_completion_logp(rollouts, ctx, "capo_calibration")

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "capo_calibration")
        mask = rollouts.completion_mask.float()
        confidence = masked_row_mean(completion_logp(rollouts, "capo_calibration"), mask)
        correct = nan_to_zero(r) > self.correct_threshold
        usable = ~torch.isnan(r) & (mask.sum(-1) > 0)
        adv = capo_pairwise_advantages(confidence, correct, usable, rollouts.group, self.tau)
        noisy = torch.zeros_like(usable)
        if self.mask_noise:
            if rollouts.ref_logp is None:
                raise ValueError("capo_calibration with mask_noise needs rollouts.ref_logp (reference model log-probs)")
            ref_confidence = masked_row_mean(rollouts.ref_logp.float(), mask)
            noisy = capo_noise_mask(ref_confidence, correct, usable, rollouts.group, self.noise_quantile)
            adv = torch.where(noisy, torch.zeros_like(adv), adv)
        self.last_metrics = {"capo/auc": confidence_auc(confidence[usable], correct[usable]),
                             "capo/frac_masked": float(noisy.float().mean()) if noisy.numel() else 0.0}
        return adv
