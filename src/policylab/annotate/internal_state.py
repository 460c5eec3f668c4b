"""Critics read from the policy's own hidden states: POISE (arXiv:2605.07579) and VERL (arXiv:2509.23808).

Both run one no-grad ``ctx.score(..., with_hidden=True)`` pass in ``annotate`` and keep only small
per-rollout features (never [B,T,H] tensors); the math is policylab/algo/advantages/hidden_state_critics.py.
Both are stateful (a trained probe; running baselines) and carry their state through
``state_dict``/``load_state_dict``. Hidden states are the last layer's (what ``ctx.score`` returns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.base_advantage import BaseAdvantage
from policylab.algo.advantages.hidden_state_critics import (
    ValueProbe,
    cross_rollout_baseline,
    entropy_features,
    masked_mean_states,
    rank_indicators,
    verl_aux,
    verl_shape,
)
from policylab.algo.advantages.reductions import rewards_of
from policylab.algo.group_stats import group_mean_std, nan_to_zero, zero_failed
from policylab.annotate.token_batches import completion_tokens, pad_id_of, prompt_tokens, token_rollouts
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

declare_field("poise_features", per_row=True, shape="[B,D]", dtype="float", owner="advantage 'poise'",
              doc="[h_p; h_o; mean, std, max, min token entropy, log L]: pooled last-layer states and entropy stats")
declare_field("poise_prompt_features", per_row=True, shape="[B,H]", dtype="float", owner="advantage 'poise'",
              doc="h_p: mean last-layer hidden state over the prompt tokens")
for _name, _what in (("verl_era", "acceleration"), ("verl_erv", "velocity"), ("verl_er", "value")):
    declare_field(_name, per_row=True, shape="[B]", dtype="float", owner="advantage 'verl_er'",
                  doc=f"effective-rank {_what} of the response's last-layer hidden states")


@torch.no_grad()
def prompt_and_completion_states(rollouts: Rollouts, ctx) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One ``ctx.score`` pass giving, per row, the hidden states at every prompt position and the states
    and entropies that predict each completion token.

    ``ctx.score`` returns states only at completion positions, so each row is laid out with its first
    prompt token as the prompt and the rest of the prompt plus the completion as the "completion": the
    state at shifted position j is the state at sequence position j. Returns (prompt states [B,P,H],
    prompt mask [B,P] — left aligned, completion states [B,T,H], completion entropies [B,T]), the
    completion tensors aligned with ``rollouts.completion_ids``.
    """
    if ctx is None or getattr(ctx, "score", None) is None:
        raise ValueError("this advantage needs ctx.score in annotate() for its hidden-state pass")
    b, width = rollouts.completion_ids.shape
    pad = pad_id_of(getattr(ctx, "tokenizer", None)) if getattr(ctx, "tokenizer", None) is not None else 0
    prompts = [prompt_tokens(rollouts, i) for i in range(b)]
    heads, tails, masks = [], [], []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"row {i} has no prompt token; the hidden-state pass needs at least one")
        n = max(len(completion_tokens(rollouts, i)), 1)  # at least the state predicting the first token
        heads.append(p[:1])
        tails.append(p[1:] + rollouts.completion_ids[i].tolist())
        masks.append([1.0] * (len(p) - 1 + n))
    out = ctx.score(token_rollouts(heads, tails, pad, completion_masks=masks), with_hidden=True)
    hidden, entropy = out.hidden.float().cpu(), out.entropy.float().cpu()
    p_max = max(len(p) for p in prompts)
    prompt_states = torch.zeros(b, p_max, hidden.shape[-1])
    prompt_mask = torch.zeros(b, p_max)
    states = torch.zeros(b, width, hidden.shape[-1])
    ent = torch.zeros(b, width)
    for i, p in enumerate(prompts):
        k = len(p)
        prompt_states[i, :k], prompt_mask[i, :k] = hidden[i, :k], 1.0
        states[i] = hidden[i, k - 1 : k - 1 + width]
        ent[i] = entropy[i, k - 1 : k - 1 + width]
    cmask = rollouts.completion_mask.float()
    return prompt_states, prompt_mask, states * cmask[..., None], ent * cmask


@register("advantage", "poise", spec="arXiv:2605.07579 (reconstructed from the abstract)")
class POISEAdvantage:
    """POISE (arXiv:2605.07579): A_i = r_i − V_φ(x_{π(i)}), a probe on the policy's own hidden states fed a
    *partner* rollout of the same prompt, so rollout i's features never enter its own baseline.

    Features x = [h_p; h_o; entropy stats]: mean last-layer hidden state over prompt and over response
    tokens, and [mean, std, max, min, log L] of the response's token entropies. V = sigmoid(MLP(x)) for
    ``reward_type="binary"`` (BCE), identity for "continuous" (MSE). Singleton groups use a prompt-only
    head V^p(h_p). Until ``warmup_steps`` probe updates have happened the baseline is the group mean.
    After computing the advantages the probe takes one epoch of Adam on this batch (the spec's "after the
    policy step": φ is not used by the policy step, so the order is immaterial).
    Reconstructed from the abstract: width 256, one hidden layer, Adam 1e-3, warm-up 10 are our defaults.
    """

    provides = ("poise_features", "poise_prompt_features")
    requires = ("rewards", "poise_features", "poise_prompt_features")

    def __init__(self, hidden_width: int = 256, lr: float = 1e-3, warmup_steps: int = 10, reward_type: str = "binary",
                 whiten: bool = False, probe_batch_size: int = 64, seed: int = 0):
        self.probe = ValueProbe(hidden_width, lr, reward_type, probe_batch_size, seed)
        self.warmup_steps, self.whiten = warmup_steps, whiten
        self.steps = 0
        self.metrics: dict[str, float] = {}

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        prompt_states, prompt_mask, states, entropy = prompt_and_completion_states(rollouts, ctx)
        cmask = rollouts.completion_mask.float()
        h_p = masked_mean_states(prompt_states, prompt_mask)
        h_o = masked_mean_states(states, cmask)
        features = torch.cat([h_p, h_o, entropy_features(entropy, cmask)], dim=-1)
        return {"poise_features": features, "poise_prompt_features": h_p}

    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = rewards_of(rollouts, "poise")
        if "poise_features" not in rollouts.extras:
            raise ValueError("poise: rollouts.extras has no hidden-state features; its annotate(rollouts, ctx) must run first")
        x, xp = rollouts.extras["poise_features"].float(), rollouts.extras["poise_prompt_features"].float()
        values, prompt_values = self.probe.predict(x, xp)
        if self.steps < self.warmup_steps:
            baseline, _, _ = group_mean_std(r, rollouts.group)
        else:
            baseline = cross_rollout_baseline(values, prompt_values, rollouts.group)
        adv = nan_to_zero(r - baseline)
        if self.whiten:
            valid = ~torch.isnan(r)
            if int(valid.sum()) > 1:
                adv = torch.where(valid, (adv - adv[valid].mean()) / (adv[valid].std() + 1e-8), adv)
        probe_loss = self.probe.fit(x, xp, r)
        self.steps += 1
        self.metrics = self._metrics(r, baseline, adv, rollouts, probe_loss)
        return zero_failed(adv, rollouts)

    @staticmethod
    def _metrics(r: Tensor, baseline: Tensor, adv: Tensor, rollouts: Rollouts, probe_loss: float) -> dict[str, float]:
        valid = ~torch.isnan(r)
        corr = 0.0
        if int(valid.sum()) > 1:
            c = torch.corrcoef(torch.stack([baseline[valid], r[valid]]))[0, 1]
            corr = float(c) if torch.isfinite(c) else 0.0
        mean, std, _ = group_mean_std(r, rollouts.group)
        grpo = nan_to_zero((r - mean) / (std + 1e-6))
        return {"poise/probe_loss": probe_loss, "poise/corr_baseline_reward": corr,
                "poise/adv_var": float(adv.var()) if adv.numel() > 1 else 0.0,
                "poise/grpo_adv_var": float(grpo.var()) if grpo.numel() > 1 else 0.0}

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def state_dict(self) -> dict:
        return {"steps": self.steps, **self.probe.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.probe.load_state_dict(state)


@register("advantage", "verl_er", spec="arXiv:2509.23808 (hf618/VERL compute_advantage, train.sh)")
class VERLAdvantage:
    """VERL (Velocity-Exploiting Rank-Learning, arXiv:2509.23808): the effective rank (ER) of the response's
    hidden states and its velocity/acceleration (ERV/ERA) give a bounded exploration/exploitation bonus
    added to the base advantage.

    δ_k = clip((x_k − μ_k)/(|μ_k| + 1e-8), −5, 5) against running baselines μ (EMA rate ``ema_alpha``
    of batch means, updated after each batch; first batch: μ := its means and no bonus);
    aux = c·(τ·tanh δ_ER + (1−τ)·tanh δ_ERV), τ = sigmoid(gain·δ_ERA); A = A0 + min(relu(aux), |A0|/κ).
    ``aux_fixed``: c = ``aux_weight``; otherwise c = aux_weight·(1 − (EMA score + 1)/2).
    Hidden states: the last layer (``ctx.score``), the state predicting each response token.
    ``max_tokens`` keeps the last tokens of long responses (None = all; the run script's value was not given).
    """

    provides = ("verl_era", "verl_erv", "verl_er")

    def __init__(self, diff_stride: int = 40, modulation_gain: float = 2.0, aux_weight: float = 1.0, aux_fixed: bool = True,
                 ema_alpha: float = 0.3, kappa: float = 2.0, max_tokens: int | None = None, base: str = "grpo",
                 base_params: dict | None = None):
        if diff_stride < 1:
            raise ValueError(f"verl_er diff_stride must be >= 1, got {diff_stride}")
        if kappa <= 0:
            raise ValueError(f"verl_er kappa must be > 0, got {kappa}")
        self.diff_stride, self.gain, self.aux_weight, self.aux_fixed = diff_stride, modulation_gain, aux_weight, aux_fixed
        self.ema_alpha, self.kappa, self.max_tokens = ema_alpha, kappa, max_tokens
        self.base = BaseAdvantage(base, base_params)
        self.baselines: Tensor | None = None  # μ over (ERA, ERV, ER)
        self.score_ema: float | None = None
        self.metrics: dict[str, float] = {}

    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("rewards", *self.base.requires, *self.provides)))

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        if ctx is None or getattr(ctx, "score", None) is None:
            raise ValueError("verl_er needs ctx.score in annotate() for its hidden-state pass")
        hidden = ctx.score(rollouts, with_hidden=True).hidden.float().cpu()
        indicators = torch.zeros(rollouts.batch_size, 3)
        for i in range(rollouts.batch_size):
            h = hidden[i][rollouts.completion_mask[i] > 0]
            if self.max_tokens is not None:
                h = h[-self.max_tokens :]
            indicators[i] = torch.tensor(rank_indicators(h, self.diff_stride))
        return dict(zip(self.provides, indicators.unbind(-1)))

    def _coef(self, rewards: Tensor) -> float:
        if self.aux_fixed:
            return self.aux_weight
        valid = rewards[~torch.isnan(rewards)]
        batch_score = float(valid.mean()) if valid.numel() else 0.0
        self.score_ema = batch_score if self.score_ema is None else (1 - self.ema_alpha) * self.score_ema + self.ema_alpha * batch_score
        return self.aux_weight * (1 - (self.score_ema + 1) / 2)

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        if "verl_er" not in rollouts.extras:
            raise ValueError("verl_er: rollouts.extras has no rank indicators; its annotate(rollouts, ctx) must run first")
        adv = self.base.sequence(rollouts, "verl_er")
        x = torch.stack([rollouts.extras[k].double() for k in self.provides], dim=-1)
        batch_mean = x.mean(0)
        coef = self._coef(rewards_of(rollouts, "verl_er"))
        if self.baselines is None:
            aux = torch.zeros(x.shape[0], dtype=torch.float64)
            self.baselines = batch_mean
            delta = torch.zeros_like(x)
        else:
            delta = ((x - self.baselines) / (self.baselines.abs() + 1e-8)).clamp(-5.0, 5.0)
            aux = verl_aux(delta, gain=self.gain, coef=coef)
            self.baselines = (1 - self.ema_alpha) * self.baselines + self.ema_alpha * batch_mean
        shaped = verl_shape(adv.double(), aux, self.kappa).float()
        bonus = aux.clamp(min=0)
        self.metrics = {
            "verl/era": float(batch_mean[0]), "verl/erv": float(batch_mean[1]), "verl/er": float(batch_mean[2]),
            "verl/tau": float(torch.sigmoid(self.gain * delta[:, 0]).mean()), "verl/aux": float(aux.mean()),
            "verl/bonus_clipped_frac": float((bonus > adv.double().abs() / self.kappa).float().mean()),
        }
        return zero_failed(shaped, rollouts)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def state_dict(self) -> dict:
        return {"baselines": None if self.baselines is None else self.baselines.tolist(), "score_ema": self.score_ema,
                "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        b = state["baselines"]
        self.baselines = None if b is None else torch.tensor(b, dtype=torch.float64)
        self.score_ema = state["score_ema"]
        self.base.load_state_dict(state.get("base", {}))
