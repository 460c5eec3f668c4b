"""Regularizers from the seed papers (advantages_rewards.md E3–E6): SIREN, DPH-RL, FG-ExPO AKL, PAPO.

Same contract as every regularizer: per-token loss [B,T] to minimise plus metrics. SIREN and DPH-RL
are scalar penalties by their papers; ``spread_scalar`` lays such a scalar over the micro-batch's tokens
so that the recipe's aggregation returns exactly that scalar over the whole mini-batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from policylab.algo.advantages_probe.common import (
    correctness,
    pad_left,
    pad_right,
    perturbed_prompt_logp,
)
from policylab.algo.objectives import masked_mean
from policylab.algo.regularizers import kl_estimate
from policylab.algo.token_selection import top_tokens_per_row
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

AGGREGATES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def spread_scalar(value: Tensor, mask: Tensor, aggregate: str = "token-mean", max_len: float = 1.0) -> Tensor:
    """Per-token loss whose aggregation with ``aggregate`` (global normaliser) sums to ``value`` over a mini-batch.

    token-mean / seq-mean-token-mean: value on every token; seq-mean-token-sum: value/L_i;
    seq-mean-token-sum-norm (C = B·max_len): value·max_len/L_i (exact when no row is empty).
    """
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    ones = torch.ones_like(mask, dtype=value.dtype) if isinstance(value, Tensor) else torch.ones_like(mask)
    if aggregate in ("token-mean", "seq-mean-token-mean"):
        return value * ones
    if aggregate == "seq-mean-token-sum":
        return value * ones / lengths
    if aggregate == "seq-mean-token-sum-norm":
        return value * ones * max_len / lengths
    raise ValueError(f"cannot spread a scalar penalty for aggregate {aggregate!r}; valid: {AGGREGATES}")


def _aggregate_of(ctx) -> tuple[str, float]:
    cfg = getattr(ctx, "config", None)
    if cfg is None:
        return "token-mean", 1.0
    agg = cfg.algorithm.aggregate
    if agg.name == "seq-mean-token-sum-norm" and agg.params.get("norm_constant", "batch_x_max_len") != "batch_x_max_len":
        raise ValueError("scalar-penalty regularizers support seq-mean-token-sum-norm only with norm_constant batch_x_max_len")
    return agg.name, float(cfg.rollout.max_new_tokens)


def _temperature_of(ctx) -> float:
    cfg = getattr(ctx, "config", None)
    t = cfg.rollout.temperature if cfg is not None else 1.0
    return t if t > 0 else 1.0


# -- SIREN (E3) ----------------------------------------------------------------------------------------------


def top_p_entropy(logits: Tensor, top_p: float = 0.8, top_k: int = 10000) -> Tensor:
    """H^p: entropy of the renormalised nucleus (E3).

    Among the top-k candidates sorted by probability, the nucleus is every token before the first index
    where the inclusive cumulative probability reaches p (empty if the top token alone reaches p -> 0).
    The nucleus choice is constant; gradients flow through the kept probabilities.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top, _ = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    with torch.no_grad():
        keep = (torch.cumsum(top, dim=-1) < top_p).float()
    nucleus = top * keep
    q = nucleus / nucleus.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(q * torch.log(q + 1e-12) * keep).sum(-1)


def peak_entropy_mask(entropy: Tensor, mask: Tensor, ratio: float = 0.8) -> Tensor:
    """m[i,t] = 1[H[i,t] > θ_i] (strict), θ_i = linear quantile ``ratio`` of row i's valid entropies (E3)."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    for i in range(entropy.shape[0]):
        valid = mask[i] > 0
        if not bool(valid.any()):
            continue
        theta = torch.quantile(entropy[i][valid].detach().float(), ratio)
        out[i] = ((entropy[i].detach() > theta) & valid).float()
    return out


def selected_entropy(entropy: Tensor, selected: Tensor) -> Tensor:
    """mean over responses with ≥ 1 selected token of their mean selected entropy (rows with none excluded)."""
    counts = selected.sum(-1)
    rows = counts > 0
    if not bool(rows.any()):
        return entropy.sum() * 0.0
    per_row = (entropy * selected).sum(-1) / counts.clamp(min=1)
    return per_row[rows].mean()


@register("regularizer", "siren", spec="advantages_rewards.md E3")
class SIRENRegularizer:
    """SIREN: c·(H_sel − H_anchor)², H_sel = top-p entropy on each response's peak-entropy tokens.

    Logits are recomputed from the training forward's hidden states (``needs_hidden``) with the policy's
    output layer (taken from ``ctx.model`` in ``prepare``), divided by the rollout temperature, in
    checkpointed chunks so no [B,T,V] tensor is kept for backward. H_anchor = H_sel of the first call
    (the initial policy), then fixed; set ``anchor`` to pin it.
    """

    needs_hidden = True

    def __init__(self, coef: float = 0.005, top_p: float = 0.8, top_k: int = 10000, mask_ratio: float = 0.8,
                 anchor: float | None = None, chunk: int = 64):
        self.coef, self.top_p, self.top_k, self.mask_ratio, self.chunk = coef, top_p, top_k, mask_ratio, chunk
        self.anchor = anchor
        self.lm_head = None
        self.temperature, self.aggregate, self.max_len = 1.0, "token-mean", 1.0

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if ctx is None or getattr(ctx, "model", None) is None:
            raise ValueError("siren needs ctx.model in prepare() (its output layer turns hidden states into logits)")
        self.lm_head = ctx.model.get_output_embeddings()
        self.temperature = _temperature_of(ctx)
        self.aggregate, self.max_len = _aggregate_of(ctx)
        return rollouts

    def entropies(self, hidden: Tensor) -> Tensor:
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)

        def chunk_entropy(h, w, b):
            logits = torch.nn.functional.linear(h, w, b).float() / self.temperature
            return top_p_entropy(logits, self.top_p, self.top_k)

        parts = []
        for start in range(0, hidden.shape[1], self.chunk):
            h = hidden[:, start : start + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                parts.append(checkpoint(chunk_entropy, h, weight, bias, use_reentrant=False))
            else:
                parts.append(chunk_entropy(h, weight, bias))
        return torch.cat(parts, dim=1)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if out.hidden is None:
            raise ValueError("siren needs PolicyOutputs.hidden (it declares needs_hidden = True)")
        if self.lm_head is None:
            raise ValueError("siren: the loop must call prepare(rollouts, ctx) first to hand over the output layer")
        mask = batch.completion_mask.to(out.hidden.device)
        h_p = self.entropies(out.hidden)
        selected = peak_entropy_mask(h_p, mask, self.mask_ratio)
        h_sel = selected_entropy(h_p, selected)
        if self.anchor is None:
            self.anchor = float(h_sel.detach())
        penalty = self.coef * (h_sel - self.anchor) ** 2
        metrics = {"siren/entropy_loss": h_sel.detach(), "siren/mse_entropy_loss": penalty.detach(),
                   "siren/entropy_anchor": torch.tensor(self.anchor),
                   "siren/selected_frac": selected.sum() / mask.sum().clamp(min=1)}
        if out.entropy is not None:
            metrics["siren/full_entropy"] = masked_mean(out.entropy.detach(), mask)
        return spread_scalar(penalty, mask, self.aggregate, self.max_len), metrics

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = state["anchor"]


# -- DPH-RL (E4) ---------------------------------------------------------------------------------------------


def _ratio_log(logp: Tensor, logp0: Tensor) -> Tensor:
    return (logp - logp0).clamp(-20.0, 20.0)


def forward_kl_f(logp: Tensor, logp0: Tensor) -> Tensor:
    """KL(π0‖π_θ) per π0-sampled token, k3 form with roles swapped: u − log u − 1, u = π_θ/π0 (clamped as E1)."""
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


@register("regularizer", "dph_rl", spec="advantages_rewards.md E4")
class DPHRehearsal:
    """DPH-RL: coef·token-mean f(π_θ/π0) on *rehearsal* samples drawn from the initial policy π0.

    Rehearsal set (online version of the paper's offline split): during the first ``collect_steps``
    steps (the policy is still π0 at step 0) every group whose first ``solved_k`` rollouts are all
    correct stores one correct rollout with its π0 log-probs (the engine's behaviour log-probs). Each
    step draws ``rehearsal_batch_size`` of them; every micro-batch runs them through the policy (with
    grad) and the penalty is spread so the recipe's aggregation adds exactly coef·mean f once per
    mini-batch. Use it without a reverse-KL term. Not done: removing the solved prompts from RL sampling.
    """

    def __init__(self, divergence: str = "forward_kl", coef: float = 0.01, alpha: float = 0.2, rehearsal_batch_size: int = 4,
                 collect_steps: int = 1, solved_k: int = 4, max_buffer: int = 1024, seed: int = 0):
        if divergence not in DIVERGENCES:
            raise ValueError(f"dph_rl divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
        if divergence == "alpha":
            alpha_f(torch.zeros(1), torch.zeros(1), alpha)  # validate now
        self.divergence, self.coef, self.alpha = divergence, coef, alpha
        self.rehearsal_batch_size, self.collect_steps, self.solved_k, self.max_buffer = rehearsal_batch_size, collect_steps, solved_k, max_buffer
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[dict[str, list]] = []
        self.steps_seen = 0
        self.model = None
        self.temperature, self.aggregate, self.max_len = 1.0, "token-mean", 1.0
        self.current: list[dict[str, list]] = []

    def f(self, logp: Tensor, logp0: Tensor) -> Tensor:
        return alpha_f(logp, logp0, self.alpha) if self.divergence == "alpha" else DIVERGENCES[self.divergence](logp, logp0)

    def collect(self, rollouts: Rollouts, ctx) -> int:
        """Add solved prompts of this (π0) batch to the rehearsal buffer; returns how many were added."""
        logp0 = rollouts.behavior_logp
        if logp0 is None:
            if getattr(ctx, "score", None) is None:
                raise ValueError("dph_rl needs behaviour log-probs from the engine or ctx.score to store π0 log-probs")
            logp0 = ctx.score(rollouts).logp
        correct = correctness(rollouts)
        added = 0
        for g in torch.unique(rollouts.group).tolist():
            rows = (rollouts.group == g).nonzero().flatten()[: self.solved_k]
            if rows.numel() < min(self.solved_k, int((rollouts.group == g).sum())) or not bool((correct[rows] > 0).all()):
                continue
            i = int(rows[0])
            length = int(rollouts.completion_mask[i].sum())
            if length == 0 or len(self.buffer) >= self.max_buffer:
                continue
            self.buffer.append({
                "prompt": rollouts.prompt_ids[i][rollouts.prompt_mask[i] > 0].tolist(),
                "completion": rollouts.completion_ids[i, :length].tolist(),
                "logp0": logp0[i, :length].float().cpu().tolist(),
            })
            added += 1
        return added

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if ctx is None or getattr(ctx, "model", None) is None:
            raise ValueError("dph_rl needs ctx.model in prepare() for its rehearsal forward passes")
        self.model, self.temperature = ctx.model, _temperature_of(ctx)
        self.aggregate, self.max_len = _aggregate_of(ctx)
        if self.steps_seen < self.collect_steps:
            self.collect(rollouts, ctx)
        self.steps_seen += 1
        if self.buffer:
            pick = torch.randint(len(self.buffer), (min(self.rehearsal_batch_size, len(self.buffer)),), generator=self.generator)
            self.current = [self.buffer[int(j)] for j in pick]
        else:
            self.current = []
        return rollouts

    def rehearsal_divergence(self) -> Tensor:
        pad = 0
        p_ids, p_mask = pad_left([x["prompt"] for x in self.current], pad)
        c_ids, c_mask = pad_right([x["completion"] for x in self.current], pad)
        logp0 = torch.zeros(c_mask.shape)
        for j, x in enumerate(self.current):
            logp0[j, : len(x["logp0"])] = torch.tensor(x["logp0"])
        logp = self._tempered_logp(p_ids, p_mask, c_ids)
        return masked_mean(self.f(logp, logp0.to(logp.device)), c_mask.to(logp.device))

    def _tempered_logp(self, p_ids: Tensor, p_mask: Tensor, c_ids: Tensor) -> Tensor:
        """Log-probs at the rollout temperature, like the training forward's and the engine's."""
        device = next(self.model.parameters()).device
        input_ids = torch.cat([p_ids, c_ids], 1).to(device)
        attention = torch.cat([p_mask, torch.ones_like(c_ids)], 1).to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
        p = p_ids.shape[1]
        logp = torch.log_softmax(logits[:, p - 1 : p - 1 + c_ids.shape[1]].float() / self.temperature, -1)
        return logp.gather(-1, c_ids.to(device)[..., None]).squeeze(-1)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask.to(out.logp.device)
        if not self.current or self.coef == 0:
            return torch.zeros_like(out.logp), {"dph/buffer_size": torch.tensor(float(len(self.buffer)))}
        divergence = self.rehearsal_divergence().to(out.logp.device)
        penalty = self.coef * divergence
        return spread_scalar(penalty, mask, self.aggregate, self.max_len), {
            "dph/rehearsal_divergence": divergence.detach(), "dph/buffer_size": torch.tensor(float(len(self.buffer)))}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "steps_seen": self.steps_seen, "generator": self.generator.get_state(),
                "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.steps_seen, self.current = state["buffer"], state["steps_seen"], state.get("current", [])
        self.generator.set_state(state["generator"])


# -- FG-ExPO AKL (E5) -----------------------------------------------------------------------------------------


def akl_beta(accuracy: float, *, beta_min: float = 0.0, beta_max: float = 0.002, center: float = 0.5, kappa: float = 10.0) -> float:
    """β_t = β_min + (β_max − β_min)·sigmoid(κ·(acc_t − a_0)) (E5): loose KL when failing, tight when succeeding."""
    return beta_min + (beta_max - beta_min) / (1.0 + math.exp(-kappa * (accuracy - center)))


@register("regularizer", "fg_expo_akl", spec="advantages_rewards.md E5; data_agents_eval.md A4")
class AccuracyConditionedKL:
    """FG-ExPO AKL: β_t·KL_est(π_θ‖π_ref) with β_t set from the batch accuracy (in ``prepare``: over the
    whole batch; without prepare: over the micro-batch). Reconstructed: β_min 0, β_max = 2·β_0 with
    β_0 = 0.001, a_0 = 0.5, κ = 10 are our defaults.
    """

    def __init__(self, beta_min: float = 0.0, beta_max: float = 0.002, center: float = 0.5, kappa: float = 10.0,
                 estimator: str = "k3"):
        if beta_max < beta_min:
            raise ValueError(f"fg_expo_akl needs beta_max >= beta_min, got {beta_max} < {beta_min}")
        kl_estimate(torch.zeros(1), torch.zeros(1), estimator)  # validate the name now
        self.beta_min, self.beta_max, self.center, self.kappa, self.estimator = beta_min, beta_max, center, kappa, estimator
        self.beta: float | None = None
        self.accuracy: float | None = None

    def needs_reference(self) -> bool:
        return self.beta_max > 0

    def _beta_for(self, rollouts: Rollouts) -> float:
        self.accuracy = float(correctness(rollouts).mean()) if rollouts.batch_size else 0.0
        return akl_beta(self.accuracy, beta_min=self.beta_min, beta_max=self.beta_max, center=self.center, kappa=self.kappa)

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        self.beta = self._beta_for(rollouts)
        return rollouts

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        beta = self.beta if self.beta is not None else self._beta_for(batch)
        if beta == 0:
            return torch.zeros_like(out.logp), {"akl/beta": torch.tensor(0.0)}
        if batch.ref_logp is None:
            raise ValueError("fg_expo_akl needs reference log-probs (rollouts.ref_logp)")
        kl = kl_estimate(out.logp, batch.ref_logp.to(out.logp.device), self.estimator)
        mask = batch.completion_mask.to(out.logp.device)
        return beta * kl, {"akl/beta": torch.tensor(beta), "akl/batch_accuracy": torch.tensor(self.accuracy or 0.0),
                           "kl": masked_mean(kl.detach(), mask)}


# -- PAPO (E6) ---------------------------------------------------------------------------------------------------


@register("regularizer", "papo", spec="advantages_rewards.md E6")
class PAPORegularizer:
    """PAPO (text analogue): −γ·KL_prcp(π_θ(·|q) ‖ π_old(·|masked q)) + double entropy loss.

    KL_prcp = k3 with the corrupted-prompt log-probs ``aug`` as reference (computed once in ``prepare``:
    each prompt token replaced with probability ``mask_prob``, the last ``protect_last`` kept — ours; the
    paper masks 60 % of image patches). Optional clip of KL_prcp to [0, ``kl_clip``] and per-response
    top-``top_fraction`` token mask by KL. Double entropy: η_aug·(−aug) + η_ori·(−log π_θ) (the aug term
    carries no gradient because aug is computed once). γ anneals linearly to ``gamma_end`` over
    ``annealing_ratio`` of ``train.steps`` when ``gamma_end`` is set; the entropy terms scale by γ_t/γ_0.
    With gamma 0 and eta_aug 0 no corrupted pass runs (VPPO's entropy penalty reuses this).
    """

    def __init__(self, gamma: float = 0.01, eta_aug: float = 0.0, eta_ori: float = 0.0, kl_clip: float | None = None,
                 top_fraction: float | None = None, gamma_end: float | None = None, annealing_ratio: float = 1.0,
                 mask_prob: float = 0.6, protect_last: int = 0, seed: int = 0, batch_size: int = 16):
        self.gamma0, self.eta_aug, self.eta_ori, self.kl_clip, self.top_fraction = gamma, eta_aug, eta_ori, kl_clip, top_fraction
        self.gamma_end, self.annealing_ratio, self.mask_prob, self.protect_last = gamma_end, annealing_ratio, mask_prob, protect_last
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.gamma = gamma

    @property
    def needs_aug(self) -> bool:
        return self.gamma0 != 0 or self.eta_aug != 0 or (self.gamma_end or 0) != 0

    def schedule(self, total_steps: int | None) -> float:
        if self.gamma_end is None or not total_steps:
            return self.gamma0
        horizon = max(1.0, self.annealing_ratio * total_steps)
        return self.gamma0 + (self.gamma_end - self.gamma0) * min(1.0, self.steps / horizon)

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        train = getattr(getattr(ctx, "config", None), "train", None)
        self.gamma = self.schedule(getattr(train, "steps", None))
        self.steps += 1
        if not self.needs_aug:
            return rollouts
        aug = perturbed_prompt_logp(rollouts, ctx, mask_prob=self.mask_prob, protect_last=self.protect_last,
                                    generator=self.generator, batch_size=self.batch_size)
        return rollouts.with_(extras=dict(rollouts.extras, papo_aug_logp=aug))

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        device = out.logp.device
        mask = batch.completion_mask.to(device)
        ratio = self.gamma / self.gamma0 if self.gamma0 else 1.0
        loss = self.eta_ori * ratio * (-out.logp)
        metrics = {"papo/gamma": torch.tensor(self.gamma), "papo/ori_entropy": masked_mean(-out.logp.detach(), mask)}
        if self.needs_aug:
            if "papo_aug_logp" not in batch.extras:
                raise ValueError("papo: batch.extras has no corrupted-prompt log-probs; the loop must call prepare(rollouts, ctx) first")
            aug = batch.extras["papo_aug_logp"].to(device)
            kl = kl_estimate(out.logp, aug, "k3")
            if self.kl_clip is not None:
                kl = kl.clamp(0.0, self.kl_clip)
            if self.top_fraction is not None:
                kl = kl * top_tokens_per_row(kl.detach(), mask, self.top_fraction)
            loss = loss - self.gamma * kl + self.eta_aug * ratio * (-aug)
            metrics.update({"papo/kl_prcp": masked_mean(kl.detach(), mask), "papo/aug_entropy": masked_mean(-aug, mask)})
        return loss, metrics

    def state_dict(self) -> dict:
        return {"steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])
