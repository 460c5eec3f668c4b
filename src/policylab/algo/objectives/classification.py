"""Rewards as class labels: REAL (arXiv:2602.05630), PACS (arXiv:2509.02522) and NFT (arXiv:2505.18116).

All three read the verifier's reward as a label (correct iff reward > ``correct_threshold``) and score a
response by the policy's own log-ratio to the rollout policy. None of them reads ``batch.advantages``.
Pure math: REAL and PACS have no batch pass at all; NFT's per-prompt correct rate is a batch statistic
(``annotate``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.algo.group_stats import group_index, group_sum
from policylab.algo.objectives.policy_gradient import masked_mean, old_logp_of, token_log_ratio
from policylab.algo.objectives.sequence_level import (
    SEQUENCE_LEVEL_AGGREGATE,
    seq_mean,
    seq_sum,
    spread_batch_loss,
    spread_row_losses,
)
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def labels_from_rewards(batch: Rollouts, threshold: float) -> tuple[Tensor, Tensor]:
    """(correct [B] bool, usable [B] bool): correct = reward > threshold; usable = reward not NaN and
    the row has trained tokens (an empty row has no log-prob to classify)."""
    if batch.rewards is None:
        raise ValueError("this objective needs rollouts.rewards (labels come from the verifier)")
    r = batch.rewards.float()
    usable = ~torch.isnan(r) & (batch.completion_mask.sum(-1) > 0)
    correct = torch.nan_to_num(r, nan=0.0) > threshold
    return correct & usable, usable

# ---------------------------------------------------------------------------------------------------
# REAL


def real_prompt_losses(score: Tensor, positive: Tensor, negative: Tensor, group: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Per-prompt REAL loss L_q and which prompts are valid.

    L_q = log(1 + sum_{i in neg} exp(s_i/tau)) + log(1 + sum_{i in pos} exp(-s_i/tau)), for prompts with at
    least one positive and one negative; the "1" is the anchor logit 0. Returns (L [K], valid [K]).
    """
    idx, k = group_index(group)
    member = idx[None, :] == torch.arange(k, device=idx.device)[:, None]  # [K,B]
    zeros = torch.zeros(k, 1, dtype=score.dtype, device=score.device)
    neg_logits = torch.where(member & negative[None, :], score[None, :] / tau, torch.full_like(member, float("-inf"), dtype=score.dtype))
    pos_logits = torch.where(member & positive[None, :], -score[None, :] / tau, torch.full_like(member, float("-inf"), dtype=score.dtype))
    loss = torch.logsumexp(torch.cat([zeros, neg_logits], 1), 1) + torch.logsumexp(torch.cat([zeros, pos_logits], 1), 1)
    valid = (member & positive[None, :]).any(1) & (member & negative[None, :]).any(1)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


class RealObjective:
    """REAL (Rewards as Labels; Zhai et al. 2026, arXiv:2602.05630): a multi-positive/multi-negative
    classification of each prompt's responses, with an anchor logit 0.

    In words: score each response by its length-normalised log-ratio to the rollout policy; per prompt, the loss
    is the log-sum-exp of the wrong responses' scores against the anchor plus that of the correct responses'
    negated scores against the anchor, and the batch loss is the mean over ALL prompts:
    s_i = (1/L_i) sum_t (logp - old_logp)   (0 at the start of a rollout step)
    L_q = log(1 + sum_neg exp(s/tau)) + log(1 + sum_pos exp(-s/tau))        (prompts with both classes)
    L   = (1/Q) sum_q L_q, Q = all prompts (all-correct / all-wrong prompts count, add 0).
    ``variant="bce"``: the repo's BCE ablation, mean over rows of valid prompts of BCE(s_i/tau, correct_i).

    Per-token loss: every row carries the batch loss L spread with weight 1/L_i, written for the
    ``seq-mean-token-sum`` aggregation (``aggregates``); ``needs_whole_groups``: the update cuts micro-batches
    at prompt boundaries, so each loss call sees whole prompts. Labels: correct iff reward > ``correct_threshold``;
    NaN rewards and empty rows are neither class.
    Shared-test tags: T-ONPOL (labels come from rewards, not batch.advantages: REAL is not REINFORCE with
    them; its own on-policy gradient, ±1/tau-bounded, is tested in tests/test_objectives_supervised_classification.py)
    and T-MICRO (the loss couples the rows of a prompt; the spec's code all-gathers them).
    """

    requires = ("rewards",)
    aggregates = (SEQUENCE_LEVEL_AGGREGATE,)  # the recipe aggregation this loss is written for
    needs_whole_groups = True

    def __init__(self, *, tau: float = 0.5, variant: str = "real", correct_threshold: float = 0.5):
        if tau <= 0:
            raise ValueError(f"real: tau must be > 0, got {tau}")
        if variant not in ("real", "bce"):
            raise ValueError(f"real: variant must be 'real' or 'bce', got {variant!r}")
        self.tau, self.variant, self.correct_threshold = tau, variant, correct_threshold

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        score = seq_mean(token_log_ratio(out, batch), mask)
        positive, usable = labels_from_rewards(batch, self.correct_threshold)
        positive, usable = positive.to(score.device), usable.to(score.device)
        negative = usable & ~positive
        group = batch.group.to(score.device)
        prompt_loss, valid = real_prompt_losses(score, positive, negative, group, self.tau)
        num_prompts = max(int(prompt_loss.numel()), 1)
        if self.variant == "real":
            total = prompt_loss.sum() / num_prompts
        else:
            idx, _ = group_index(group)
            in_valid = valid[idx] & usable
            bce = F.binary_cross_entropy_with_logits(score / self.tau, positive.float(), reduction="none")
            total = (bce * in_valid).sum() / in_valid.sum().clamp(min=1)
        total = total + 0.0 * score.sum()  # keeps the graph when no prompt is valid
        s = score.detach()
        metrics = {
            "real/loss": total.detach(),
            "real/valid_prompt_frac": valid.float().mean() if valid.numel() else torch.tensor(0.0),
            "real/score_pos": s[positive].mean() if positive.any() else torch.tensor(0.0),
            "real/score_neg": s[negative].mean() if negative.any() else torch.tensor(0.0),
            "ppo_kl": masked_mean(-token_log_ratio(out, batch).detach(), mask),
        }
        return spread_batch_loss(total, mask), metrics


register("objective", "real", spec="arXiv:2602.05630 (REAL, per-prompt loss L_q with anchor logits)",
         tags=("skip:T-ONPOL", "skip:T-MICRO"))(RealObjective)


# ---------------------------------------------------------------------------------------------------
# PACS


def pacs_row_losses(implicit_reward: Tensor, label: Tensor, usable: Tensor, group: Tensor, *, score: str = "rloo",
                    class_balance: bool = True) -> tuple[Tensor, Tensor]:
    """PACS per-row loss w_i * BCEwithLogits(psi_i, R_i) and the score psi.

    psi: ``rloo`` psi_i = r_i - mean_{j != i} r_j (within the prompt, usable rows); ``grpo`` (r - mean)/(std + 1e-6);
    ``raw`` psi = r. Class weights (sklearn "balanced", per prompt, only when both classes are present):
    w_i = n / (2 * count_{label_i}); otherwise 1. Unusable rows get weight 0.
    """
    idx, k = group_index(group)
    u = usable.to(implicit_reward.dtype)
    count = group_sum(u, idx, k)
    total = group_sum(implicit_reward * u, idx, k)
    if score == "rloo":
        others = (count[idx] - 1).clamp(min=1)
        baseline = torch.where(count[idx] > 1, (total[idx] - implicit_reward * u) / others, torch.zeros_like(implicit_reward))
        psi = implicit_reward - baseline
    elif score == "grpo":
        mean = total / count.clamp(min=1)
        var = group_sum((implicit_reward - mean[idx]) ** 2 * u, idx, k) / (count - 1).clamp(min=1)
        psi = (implicit_reward - mean[idx]) / (var.sqrt()[idx] + 1e-6)
    elif score == "raw":
        psi = implicit_reward
    else:
        raise ValueError(f"pacs: score must be 'rloo', 'grpo' or 'raw', got {score!r}")
    weight = u.clone()
    if class_balance:
        lab = label.to(implicit_reward.dtype) * u
        n_pos = group_sum(lab, idx, k)
        n_neg = count - n_pos
        both = (n_pos > 0) & (n_neg > 0)
        balanced = torch.where(label.bool(), count[idx] / (2 * n_pos[idx].clamp(min=1)), count[idx] / (2 * n_neg[idx].clamp(min=1)))
        weight = torch.where(both[idx] & usable, balanced, weight)
    bce = F.binary_cross_entropy_with_logits(psi, label.to(psi.dtype), reduction="none")
    return weight * bce, psi


class PacsObjective:
    """PACS (implicit actor-critic coupling; Li et al. 2025, arXiv:2509.02522): the outcome label is predicted
    from an implicit-reward score with a class-balanced binary cross-entropy.

    In words: the implicit reward is beta times the sequence log-ratio to the rollout policy; its score is that
    reward minus the mean of the other responses' rewards to the same prompt (RLOO); the loss is the weighted
    BCE of the score against the correct/wrong label:
    r^_i = beta * sum_t (logp - old_logp)  (``reward_method="sum"``; ``"mean"``: beta * mean_t logp)
    psi_i = r^_i - (1/(n-1)) sum_{j != i} r^_j   (``score="rloo"``; or "grpo" / "raw")
    L = (1/N) sum_i w_i * BCEwithLogits(psi_i, R_i), w = per-prompt balanced class weights (``class_balance``).

    Per-token loss: row i carries w_i*BCE_i spread with weight 1/L_i, written for ``seq-mean-token-sum``
    (``aggregates``: the mean over rows, the PyTorch weighted mean the spec names). The RLOO score couples the
    rows of a prompt: ``needs_whole_groups``.
    Shared-test tags: T-ONPOL (labels from rewards, not batch.advantages), T-ZEROADV (an all-equal prompt
    gives zero gradient only at psi = 0, i.e. on-policy; off-policy psi != 0 and BCE still pulls), T-MICRO.
    """

    requires = ("rewards",)
    aggregates = (SEQUENCE_LEVEL_AGGREGATE,)  # the recipe aggregation this loss is written for
    needs_whole_groups = True

    def __init__(self, *, beta: float = 1.0, reward_method: str = "sum", score: str = "rloo", class_balance: bool = True,
                 correct_threshold: float = 0.5):
        if reward_method not in ("sum", "mean"):
            raise ValueError(f"pacs: reward_method must be 'sum' (log-ratio sum) or 'mean' (mean logp), got {reward_method!r}")
        if score not in ("rloo", "grpo", "raw"):
            raise ValueError(f"pacs: score must be 'rloo', 'grpo' or 'raw', got {score!r}")
        self.beta, self.reward_method, self.score = beta, reward_method, score
        self.class_balance, self.correct_threshold = class_balance, correct_threshold

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        if self.reward_method == "sum":
            implicit = self.beta * seq_sum(token_log_ratio(out, batch), mask)
        else:
            implicit = self.beta * seq_mean(out.logp, mask)
        label, usable = labels_from_rewards(batch, self.correct_threshold)
        label, usable = label.to(implicit.device), usable.to(implicit.device)
        row_loss, psi = pacs_row_losses(implicit, label, usable, batch.group.to(implicit.device), score=self.score,
                                        class_balance=self.class_balance)
        p = psi.detach()
        correct, wrong = label & usable, usable & ~label
        metrics = {
            "pacs/loss": row_loss.detach().sum() / usable.sum().clamp(min=1),
            "pacs/psi_correct": p[correct].mean() if correct.any() else torch.tensor(0.0),
            "pacs/psi_incorrect": p[wrong].mean() if wrong.any() else torch.tensor(0.0),
            "pacs/sign_accuracy": ((p > 0) == label)[usable].float().mean() if usable.any() else torch.tensor(0.0),
            "ppo_kl": masked_mean(-token_log_ratio(out, batch).detach(), mask),
        }
        return spread_row_losses(row_loss, mask), metrics


register("objective", "pacs", spec="arXiv:2509.02522 (PACS, RLOO-scored implicit reward, balanced BCE)",
         tags=("skip:T-ONPOL", "skip:T-ZEROADV", "skip:T-MICRO"))(PacsObjective)


# ---------------------------------------------------------------------------------------------------
# NFT


def clamp_preserve_grad(x: Tensor, minimum: float) -> Tensor:
    """Value max(x, minimum), gradient of the identity (straight-through), NFT's ``cp``."""
    return x + (x.clamp(min=minimum) - x).detach()


def nft_token_losses(ratio: Tensor, positive: Tensor, correct_rate: Tensor, *, clamp_positive: float = 0.0,
                     clamp_negative: float = 1.0, neg_weight: float = 1.0, normalize: int = 1) -> Tensor:
    """NFT per-position loss, ratio R and the prompt's clamped correct rate r^ broadcast alike.

    positive: -log cp(R, clamp_positive); negative: -neg_weight * log cp((1 - r^ R)/(1 - r^), clamp_negative);
    then x (1 - r^) (normalize=1), x sqrt((1 - r^)/r^) (normalize=2) or x 1 (normalize=0).
    """
    pos = -torch.log(clamp_preserve_grad(ratio, clamp_positive).clamp(min=1e-30))
    proxy = (1 - correct_rate * ratio) / (1 - correct_rate)
    neg = -torch.log(clamp_preserve_grad(proxy, clamp_negative).clamp(min=1e-30)) * neg_weight
    loss = torch.where(positive, pos, neg)
    if normalize == 1:
        loss = loss * (1 - correct_rate)
    elif normalize == 2:
        loss = loss * torch.sqrt((1 - correct_rate) / correct_rate)
    elif normalize != 0:
        raise ValueError(f"nft: normalize must be 0, 1 or 2, got {normalize}")
    return loss


def group_correct_rate(correct: Tensor, usable: Tensor, group: Tensor) -> Tensor:
    """[B] fraction of usable rows of the row's prompt that are correct."""
    idx, k = group_index(group)
    n = group_sum(usable.float(), idx, k)
    c = group_sum((correct & usable).float(), idx, k)
    return (c / n.clamp(min=1))[idx]


NFT_CORRECT_RATE = declare_field("nft_correct_rate", per_row=True, shape="[B]", dtype="float", owner="objective 'nft'",
                                 doc="fraction of correct usable rows of the row's prompt, over the whole rollout batch "
                                     "(before clamping to [rate_min, rate_max])")


class NftObjective:
    """NFT (Negative-aware Fine-Tuning; Chen et al. 2025, arXiv:2505.18116): likelihood on positives, and an
    implicit negative policy (pi_old - r^ pi)/(1 - r^) fitted by maximum likelihood on negatives.

    In words: raise the likelihood ratio R of correct responses; for wrong ones, raise the likelihood of the implicit
    negative policy, i.e. lower R in proportion to the prompt's correct rate r^:
    R = exp(min(logp - old_logp, 10)) per token (``ratio_type="token"``) or exp(min(sum_t(logp - old_logp), 10))
    per sequence (``"sequence"``, spread with 1/L_i); r^ = clamp(prompt correct rate, rate_min, rate_max).
    The log-ratio is clamped from above only, as in the paper and its code: a lower clamp would zero the gradient
    of a correct response exactly when its likelihood has fallen furthest (R itself keeps a 1e-30 floor).
    Token losses from :func:`nft_token_losses`. neg_weight 1 = NFT, 0 = RFT; the code's "<0 = DAPO" branch is
    the ``dapo`` recipe here. Aggregation: the code divides per-sequence token sums by the constant 1000;
    the recipe uses ``seq-mean-token-sum-norm`` (a constant normaliser, C = max_new_tokens; our choice).
    ``annotate`` computes the correct rate once per rollout batch (a batch statistic, field ``nft_correct_rate``);
    a bare call without it derives the rate from the rows it sees.
    Shared-test tags: T-ONPOL (on-policy NFT equals REINFORCE with Dr.GRPO-style advantages 1 - r^ / -r^ derived
    from rewards, not with batch.advantages; tested on its own), T-ZEROADV (r^ is clamped to 0.98, so an all-correct
    prompt keeps weight 0.02; the code relies on DAPO dynamic sampling to drop it), T-MICRO (a bare call derives r^
    from the micro-batch's rows; in training the annotated rate makes it exact).
    """

    requires = ("rewards",)
    provides = (NFT_CORRECT_RATE,)

    def __init__(self, *, neg_weight: float = 1.0, clamp_negative: float = 1.0, clamp_positive: float = 0.0,
                 normalize: int = 1, ratio_type: str = "token", rate_min: float = 0.02, rate_max: float = 0.98,
                 correct_threshold: float = 0.5):
        if neg_weight < 0:
            raise ValueError("nft: neg_weight < 0 selects the DAPO loss in the NFT code; use the 'dapo' recipe instead")
        if ratio_type not in ("token", "sequence"):
            raise ValueError(f"nft: ratio_type must be 'token' or 'sequence', got {ratio_type!r}")
        if normalize not in (0, 1, 2):
            raise ValueError(f"nft: normalize must be 0, 1 or 2, got {normalize}")
        if not 0 < rate_min <= rate_max < 1:
            raise ValueError(f"nft: need 0 < rate_min <= rate_max < 1, got {rate_min}, {rate_max}")
        self.neg_weight, self.clamp_negative, self.clamp_positive = neg_weight, clamp_negative, clamp_positive
        self.normalize, self.ratio_type = normalize, ratio_type
        self.rate_min, self.rate_max, self.correct_threshold = rate_min, rate_max, correct_threshold

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        """The per-prompt correct rate over the whole rollout batch (before micro-batching)."""
        correct, usable = labels_from_rewards(rollouts, self.correct_threshold)
        return {"nft_correct_rate": group_correct_rate(correct, usable, rollouts.group)}

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        correct, usable = labels_from_rewards(batch, self.correct_threshold)
        rate = batch.extras.get("nft_correct_rate")
        if rate is None:
            rate = group_correct_rate(correct, usable, batch.group)
        device = out.logp.device
        rate = rate.to(device).float().clamp(self.rate_min, self.rate_max)
        correct, usable = correct.to(device), usable.to(device)
        log_ratio = out.logp - old_logp_of(out, batch).to(device)
        opts = dict(clamp_positive=self.clamp_positive, clamp_negative=self.clamp_negative, neg_weight=self.neg_weight,
                    normalize=self.normalize)
        if self.ratio_type == "token":
            ratio = torch.exp(log_ratio.clamp(max=10.0))
            loss = nft_token_losses(ratio, correct[:, None].expand_as(ratio), rate[:, None].expand_as(ratio), **opts)
            loss = loss * usable[:, None]
        else:
            ratio = torch.exp(seq_sum(log_ratio, mask).clamp(max=10.0))
            loss = spread_row_losses(nft_token_losses(ratio, correct, rate, **opts) * usable, mask)
        loss = torch.where(mask > 0, loss, torch.zeros_like(loss))
        r = ratio.detach() if self.ratio_type == "token" else ratio.detach()[:, None].expand_as(mask)
        pos_tok = mask * correct[:, None]
        neg_tok = mask * (usable & ~correct)[:, None]
        proxy = (1 - rate[:, None] * r) / (1 - rate[:, None])
        metrics = {
            "nft/ratio_pos": masked_mean(r, pos_tok),
            "nft/ratio_neg": masked_mean(r, neg_tok),
            "nft/neg_clamped_frac": masked_mean((proxy < self.clamp_negative).float(), neg_tok),
            "nft/correct_rate": rate.mean() if rate.numel() else torch.tensor(0.0),
            "ppo_kl": masked_mean(-log_ratio.detach(), mask),
        }
        return loss, metrics


register("objective", "nft", spec="arXiv:2505.18116 (NFT, implicit negative policy)",
         tags=("skip:T-ONPOL", "skip:T-ZEROADV", "skip:T-MICRO"))(NftObjective)
