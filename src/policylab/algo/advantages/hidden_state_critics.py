"""Critics and bonuses computed from the policy's own hidden states: POISE (arXiv:2605.07579) and VERL
(arXiv:2509.23808).

Inputs are small per-rollout features that an annotator extracted in one no-grad pass
(policylab/annotate/internal_state.py): POISE's pooled hidden states and entropy statistics, VERL's
effective-rank indicators. Here: the features' definitions, POISE's online value probe with its
cross-rollout baseline, and VERL's bounded bonus.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policylab.algo.group_stats import group_index, group_rank

# -- POISE -----------------------------------------------------------------------------------------------


def entropy_features(entropy: Tensor, mask: Tensor) -> Tensor:
    """[B,5] = [mean, std, max, min of token entropy over valid tokens, log L]; empty rows -> zeros."""
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


def masked_mean_states(states: Tensor, mask: Tensor) -> Tensor:
    """[B,H] mean of ``states`` [B,N,H] over the positions where ``mask`` [B,N] is 1 (0 for an empty row)."""
    mask = mask.float()
    return (states * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True).clamp(min=1)


def cross_rollout_baseline(values: Tensor, prompt_values: Tensor, group: Tensor) -> Tensor:
    """b_i = V(x_{π(i)}) with partner π(i) = the next rollout of i's group (cyclic, order of appearance);
    singleton groups use the prompt-only head V^p. Rollout i's own features never enter b_i."""
    rank, size = group_rank(group)
    idx, k = group_index(group)
    members: list[list[int]] = [[] for _ in range(k)]
    for i, g in enumerate(idx.tolist()):
        members[g].append(i)
    partner = torch.tensor([members[g][(int(rank[i]) + 1) % int(size[i])] for i, g in enumerate(idx.tolist())],
                           dtype=torch.long)
    return torch.where(size > 1, values[partner], prompt_values)


class _Head(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


class ValueProbe:
    """POISE's reward predictor: V(x) over [h_p; h_o; entropy stats] and a prompt-only head V^p(h_p), one
    hidden layer of ``width``; sigmoid/BCE for binary rewards, identity/MSE for continuous ones; Adam.
    Built lazily from the first features' sizes (seeded), trained one epoch per batch."""

    def __init__(self, width: int = 256, lr: float = 1e-3, reward_type: str = "binary", batch_size: int = 64,
                 seed: int = 0):
        if reward_type not in ("binary", "continuous"):
            raise ValueError(f"poise reward_type must be 'binary' or 'continuous', got {reward_type!r}")
        self.width, self.lr, self.reward_type, self.batch_size, self.seed = width, lr, reward_type, batch_size, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.value_head: _Head | None = None
        self.prompt_head: _Head | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dims: tuple[int, int] | None = None

    def _build(self, dim: int, prompt_dim: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.value_head, self.prompt_head = _Head(dim, self.width), _Head(prompt_dim, self.width)
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
        if self.value_head is None:
            self._build(features.shape[-1], prompt_features.shape[-1])
        valid = (~torch.isnan(rewards)).nonzero().flatten()
        if valid.numel() == 0:
            return 0.0
        order = valid[torch.randperm(valid.numel(), generator=self.generator)]
        losses = []
        for start in range(0, order.numel(), self.batch_size):
            rows = order[start : start + self.batch_size]
            with torch.enable_grad():
                loss = self._loss(self.value_head(features[rows]), rewards[rows]) + \
                    self._loss(self.prompt_head(prompt_features[rows]), rewards[rows])
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "dims": self.dims}
        if self.value_head is not None:
            state.update(value_head=self.value_head.state_dict(), prompt_head=self.prompt_head.state_dict(),
                         optimizer=self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if state.get("dims") is not None:
            self._build(*state["dims"])
            self.value_head.load_state_dict(state["value_head"])
            self.prompt_head.load_state_dict(state["prompt_head"])
            self.optimizer.load_state_dict(state["optimizer"])


# -- VERL --------------------------------------------------------------------------------------------------


def effective_rank(h: Tensor) -> float:
    """ER = exp(−Σ p log(p + 1e-8)), p = σ/Σσ of the row-centred matrix; n < 2 or SVD failure -> 0."""
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
    """A = A0 + min(relu(aux), |A0|/κ): a positive bonus only, never more than |A0|/κ."""
    return adv + torch.minimum(aux.clamp(min=0), adv.abs() / kappa)
