"""Critics read from the policy's own hidden states: POISE (advantages_rewards.md B14) and VERL (B15).

Both run one extra no-grad forward pass in ``prepare`` and keep only small per-rollout features in
``rollouts.extras`` (never [B,T,H] tensors). Both are stateful (a trained probe; running baselines) and
carry their state through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policylab.algo.advantages_probe.common import (
    BaseAdvantage,
    completion_forward,
    eval_mode,
    group_rank,
    require_rewards,
    zero_failed,
)
from policylab.algo.group_stats import group_index, group_mean_std, nan_to_zero
from policylab.registry import register
from policylab.rollouts import Rollouts


def _forward_rows(ctx, rollouts: Rollouts, batch_size: int, *, hidden_layer: int = -1, prompt_hidden: bool = False):
    """Yield (row indices, completion_forward output) over chunks of ``rollouts`` (no grad)."""
    if ctx is None or getattr(ctx, "model", None) is None:
        raise ValueError("this advantage needs ctx.model in prepare() for its hidden-state pass")
    for start in range(0, rollouts.batch_size, batch_size):
        rows = list(range(start, min(start + batch_size, rollouts.batch_size)))
        with torch.no_grad(), eval_mode(ctx.model):
            out = completion_forward(ctx.model, rollouts.prompt_ids[rows], rollouts.prompt_mask[rows],
                                     rollouts.completion_ids[rows], with_hidden=True, hidden_layer=hidden_layer,
                                     with_prompt_hidden=prompt_hidden)
        yield rows, {k: v.detach().float().cpu() for k, v in out.items()}


# -- POISE (B14) -------------------------------------------------------------------------------------------


def entropy_features(entropy: Tensor, mask: Tensor) -> Tensor:
    """[B,5] = [mean, std, max, min of token entropy over valid tokens, log L] (B14); empty rows -> zeros."""
    valid = mask > 0
    length = valid.sum(-1).float()
    n = length.clamp(min=1)
    mean = (entropy * valid).sum(-1) / n
    var = (((entropy - mean[:, None]) * valid) ** 2).sum(-1) / n
    big = torch.finfo(entropy.dtype).max
    hi = torch.where(valid, entropy, torch.full_like(entropy, -big)).max(-1).values
    lo = torch.where(valid, entropy, torch.full_like(entropy, big)).min(-1).values
    empty = length == 0
    hi, lo = torch.where(empty, torch.zeros_like(hi), hi), torch.where(empty, torch.zeros_like(lo), lo)
    return torch.stack([mean, var.sqrt(), hi, lo, torch.log(length.clamp(min=1))], dim=-1)


def cross_rollout_baseline(values: Tensor, prompt_values: Tensor, group: Tensor) -> Tensor:
    """b_i = V(x_{π(i)}) with partner π(i) = the next rollout of i's group (cyclic, order of appearance);
    singleton groups use the prompt-only head V^p (B14). Rollout i's own features never enter b_i."""
    rank, size = group_rank(group)
    idx, k = group_index(group)
    members: list[list[int]] = [[] for _ in range(k)]
    for i, g in enumerate(idx.tolist()):
        members[g].append(i)
    partner = torch.tensor([members[g][(int(rank[i]) + 1) % int(size[i])] for i, g in enumerate(idx.tolist())],
                           dtype=torch.long)
    return torch.where(size > 1, values[partner], prompt_values)


class _Probe(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


@register("advantage", "poise", spec="advantages_rewards.md B14")
class POISEAdvantage:
    """POISE: A_i = r_i − V_φ(x_{π(i)}), a probe on the policy's hidden states, fed a *partner* rollout.

    Features x = [h_p; h_o; entropy stats]: mean last-layer hidden state over prompt and over response
    tokens, and [mean, std, max, min, log L] of the response's token entropies. V = sigmoid(MLP(x)) for
    ``reward_type="binary"`` (BCE), identity for "continuous" (MSE). Singleton groups use a prompt-only
    head V^p(h_p). Until ``warmup_steps`` probe updates have happened the baseline is the group mean.
    After computing the advantages the probe takes one epoch of Adam on this batch (the spec's "after the
    policy step": φ is not used by the policy step, so the order is immaterial).
    Reconstructed from the abstract: width 256, one hidden layer, Adam 1e-3, warm-up 10 are our defaults.
    """

    def __init__(self, hidden_width: int = 256, lr: float = 1e-3, warmup_steps: int = 10, reward_type: str = "binary",
                 whiten: bool = False, probe_batch_size: int = 64, forward_batch_size: int = 16, seed: int = 0):
        if reward_type not in ("binary", "continuous"):
            raise ValueError(f"poise reward_type must be 'binary' or 'continuous', got {reward_type!r}")
        self.hidden_width, self.lr, self.warmup_steps, self.reward_type = hidden_width, lr, warmup_steps, reward_type
        self.whiten, self.probe_batch_size, self.forward_batch_size, self.seed = whiten, probe_batch_size, forward_batch_size, seed
        self.steps = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.value_head: _Probe | None = None
        self.prompt_head: _Probe | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dims: tuple[int, int] | None = None
        self.metrics: dict[str, float] = {}

    # -- features ----------------------------------------------------------------------------------
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        features = prompt_features = None
        for rows, out in _forward_rows(ctx, rollouts, self.forward_batch_size, prompt_hidden=True):
            pmask = rollouts.prompt_mask[rows].float()
            cmask = rollouts.completion_mask[rows].float()
            h_p = (out["prompt_hidden"] * pmask[..., None]).sum(1) / pmask.sum(-1, keepdim=True).clamp(min=1)
            h_o = (out["hidden"] * cmask[..., None]).sum(1) / cmask.sum(-1, keepdim=True).clamp(min=1)
            x = torch.cat([h_p, h_o, entropy_features(out["entropy"], cmask)], dim=-1)
            if features is None:
                features = torch.zeros(rollouts.batch_size, x.shape[-1])
                prompt_features = torch.zeros(rollouts.batch_size, h_p.shape[-1])
            features[rows], prompt_features[rows] = x, h_p
        return rollouts.with_(extras=dict(rollouts.extras, poise_features=features, poise_prompt_features=prompt_features))

    # -- probe ----------------------------------------------------------------------------------------
    def _build(self, dim: int, prompt_dim: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.value_head, self.prompt_head = _Probe(dim, self.hidden_width), _Probe(prompt_dim, self.hidden_width)
        self.optimizer = torch.optim.Adam(list(self.value_head.parameters()) + list(self.prompt_head.parameters()), lr=self.lr)
        self.dims = (dim, prompt_dim)

    def _link(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.reward_type == "binary" else raw

    def _loss(self, raw: Tensor, target: Tensor) -> Tensor:
        if self.reward_type == "binary":
            return nn.functional.binary_cross_entropy_with_logits(raw, target.clamp(0.0, 1.0))
        return nn.functional.mse_loss(raw, target)

    def predict(self, features: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        """(V(x) [B], V^p(h_p) [B]) with the current probe (no grad)."""
        if self.value_head is None:
            self._build(features.shape[-1], prompt_features.shape[-1])
        with torch.no_grad():
            return self._link(self.value_head(features)), self._link(self.prompt_head(prompt_features))

    def fit(self, features: Tensor, prompt_features: Tensor, rewards: Tensor) -> float:
        """One epoch of Adam on (x_j, r_j) and (h_p,j, r_j) over rows with a valid reward; mean loss."""
        valid = (~torch.isnan(rewards)).nonzero().flatten()
        if valid.numel() == 0:
            return 0.0
        order = valid[torch.randperm(valid.numel(), generator=self.generator)]
        losses = []
        for start in range(0, order.numel(), self.probe_batch_size):
            rows = order[start : start + self.probe_batch_size]
            with torch.enable_grad():
                loss = self._loss(self.value_head(features[rows]), rewards[rows]) + \
                    self._loss(self.prompt_head(prompt_features[rows]), rewards[rows])
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    # -- advantages --------------------------------------------------------------------------------------
    def __call__(self, rollouts: Rollouts) -> Tensor:
        r = require_rewards(rollouts, "poise")
        if "poise_features" not in rollouts.extras:
            raise ValueError("poise: rollouts.extras has no hidden-state features; the loop must call prepare(rollouts, ctx) first")
        x, xp = rollouts.extras["poise_features"].float(), rollouts.extras["poise_prompt_features"].float()
        values, prompt_values = self.predict(x, xp)
        if self.steps < self.warmup_steps:
            baseline, _, _ = group_mean_std(r, rollouts.group)
        else:
            baseline = cross_rollout_baseline(values, prompt_values, rollouts.group)
        adv = nan_to_zero(r - baseline)
        if self.whiten:
            valid = ~torch.isnan(r)
            if int(valid.sum()) > 1:
                adv = torch.where(valid, (adv - adv[valid].mean()) / (adv[valid].std() + 1e-8), adv)
        probe_loss = self.fit(x, xp, r)
        self.steps += 1
        self.metrics = self._metrics(r, baseline, adv, rollouts, probe_loss)
        return zero_failed(adv, rollouts)

    @staticmethod
    def _metrics(r: Tensor, baseline: Tensor, adv: Tensor, rollouts: Rollouts, probe_loss: float) -> dict[str, float]:
        valid = ~torch.isnan(r)
        corr = 0.0
        if int(valid.sum()) > 1:
            pair = torch.stack([baseline[valid], r[valid]])
            c = torch.corrcoef(pair)[0, 1]
            corr = float(c) if torch.isfinite(c) else 0.0
        mean, std, _ = group_mean_std(r, rollouts.group)
        grpo = nan_to_zero((r - mean) / (std + 1e-6))
        return {"poise/probe_loss": probe_loss, "poise/corr_baseline_reward": corr,
                "poise/adv_var": float(adv.var()) if adv.numel() > 1 else 0.0,
                "poise/grpo_adv_var": float(grpo.var()) if grpo.numel() > 1 else 0.0}

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def state_dict(self) -> dict:
        state = {"steps": self.steps, "generator": self.generator.get_state(), "dims": self.dims}
        if self.value_head is not None:
            state.update(value_head=self.value_head.state_dict(), prompt_head=self.prompt_head.state_dict(),
                         optimizer=self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])
        if state.get("dims") is not None:
            self._build(*state["dims"])
            self.value_head.load_state_dict(state["value_head"])
            self.prompt_head.load_state_dict(state["prompt_head"])
            self.optimizer.load_state_dict(state["optimizer"])


# -- VERL (B15) --------------------------------------------------------------------------------------------


def effective_rank(h: Tensor) -> float:
    """ER = exp(−Σ p log(p + 1e-8)), p = σ/Σσ of the row-centred matrix (B15); n < 2 or SVD failure -> 0."""
    if h.shape[0] < 2:
        return 0.0
    centred = h.double() - h.double().mean(0, keepdim=True)
    try:
        sigma = torch.linalg.svdvals(centred)
    except RuntimeError:
        return 0.0
    total = sigma.sum()
    if not torch.isfinite(total) or total <= 0:
        return 0.0
    p = sigma / total
    return float(torch.exp(-(p * torch.log(p + 1e-8)).sum()))


def rank_dynamics(checkpoint_ranks: list[float]) -> tuple[float, float]:
    """(ERV, ERA) from m_j: d_j = m_j − mean(m_0..m_{j−1}) (j ≥ 1), d2_j = d_j − d_{j−1} (j ≥ 2); missing -> 0."""
    m = checkpoint_ranks
    d = [m[j] - sum(m[:j]) / j for j in range(1, len(m))]
    d2 = [d[j] - d[j - 1] for j in range(1, len(d))]
    return (sum(d) / len(d) if d else 0.0), (sum(d2) / len(d2) if d2 else 0.0)


def rank_indicators(h: Tensor, stride: int) -> tuple[float, float, float]:
    """(ERA, ERV, ER) of one response's hidden states [L,d]; checkpoints at t = s, 2s, ... < L over H[:t]."""
    length = h.shape[0]
    ranks = [effective_rank(h[:t]) for t in range(stride, length, stride)] if stride > 0 else []
    erv, era = rank_dynamics(ranks)
    return era, erv, effective_rank(h)


def verl_aux(delta: Tensor, *, gain: float = 2.0, coef: float = 1.0) -> Tensor:
    """aux = c·Σ_k w_k tanh(δ_k), w = τ·(0,0,1) + (1−τ)·(0,1,0), τ = sigmoid(g·δ_ERA); δ columns (ERA, ERV, ER)."""
    tau = torch.sigmoid(gain * delta[:, 0])
    return coef * (tau * torch.tanh(delta[:, 2]) + (1 - tau) * torch.tanh(delta[:, 1]))


def verl_shape(adv: Tensor, aux: Tensor, kappa: float = 2.0) -> Tensor:
    """A = A0 + min(relu(aux), |A0|/κ): a positive bonus only, never more than |A0|/κ (B15)."""
    return adv + torch.minimum(aux.clamp(min=0), adv.abs() / kappa)


@register("advantage", "verl_er", spec="advantages_rewards.md B15")
class VERLAdvantage:
    """VERL: effective rank (ER) of response hidden states and its velocity/acceleration (ERV/ERA) give a
    bounded exploration/exploitation bonus added to the base advantage.

    δ_k = clip((x_k − μ_k)/(|μ_k| + 1e-8), −5, 5) against running baselines μ (EMA rate ``ema_alpha``
    of batch means, updated after each batch; first batch: μ := its means and no bonus).
    ``aux_fixed``: c = ``aux_weight``; otherwise c = aux_weight·(1 − (EMA score + 1)/2).
    Hidden states: layer ``hidden_layer`` of one no-grad pass, the state predicting each response token.
    ``max_tokens`` keeps the last tokens of long responses (None = all; the run script's value was not given).
    """

    def __init__(self, diff_stride: int = 40, modulation_gain: float = 2.0, aux_weight: float = 1.0, aux_fixed: bool = True,
                 ema_alpha: float = 0.3, kappa: float = 2.0, max_tokens: int | None = None, hidden_layer: int = -1,
                 forward_batch_size: int = 16, base: str = "grpo", base_params: dict | None = None):
        if diff_stride < 1:
            raise ValueError(f"verl_er diff_stride must be >= 1, got {diff_stride}")
        if kappa <= 0:
            raise ValueError(f"verl_er kappa must be > 0, got {kappa}")
        self.diff_stride, self.gain, self.aux_weight, self.aux_fixed = diff_stride, modulation_gain, aux_weight, aux_fixed
        self.ema_alpha, self.kappa, self.max_tokens, self.hidden_layer = ema_alpha, kappa, max_tokens, hidden_layer
        self.forward_batch_size = forward_batch_size
        self.base = BaseAdvantage(base, base_params)
        self.baselines: Tensor | None = None  # μ over (ERA, ERV, ER)
        self.score_ema: float | None = None
        self.metrics: dict[str, float] = {}

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        indicators = torch.zeros(rollouts.batch_size, 3)
        for rows, out in _forward_rows(ctx, rollouts, self.forward_batch_size, hidden_layer=self.hidden_layer):
            for j, i in enumerate(rows):
                h = out["hidden"][j][rollouts.completion_mask[i] > 0]
                if self.max_tokens is not None:
                    h = h[-self.max_tokens :]
                indicators[i] = torch.tensor(rank_indicators(h, self.diff_stride))
        return rollouts.with_(extras=dict(rollouts.extras, verl_indicators=indicators))

    def _coef(self, rewards: Tensor) -> float:
        if self.aux_fixed:
            return self.aux_weight
        valid = rewards[~torch.isnan(rewards)]
        batch_score = float(valid.mean()) if valid.numel() else 0.0
        self.score_ema = batch_score if self.score_ema is None else (1 - self.ema_alpha) * self.score_ema + self.ema_alpha * batch_score
        return self.aux_weight * (1 - (self.score_ema + 1) / 2)

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        if "verl_indicators" not in rollouts.extras:
            raise ValueError("verl_er: rollouts.extras has no rank indicators; the loop must call prepare(rollouts, ctx) first")
        adv = self.base(rollouts)
        if adv.dim() != 1:
            raise ValueError("verl_er shapes a sequence-level base advantage; the base returned [B,T]")
        x = rollouts.extras["verl_indicators"].double()
        batch_mean = x.mean(0)
        coef = self._coef(require_rewards(rollouts, "verl_er"))
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

