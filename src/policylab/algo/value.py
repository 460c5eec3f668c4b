"""A critic for the methods that need one: a linear value head on the policy's last hidden states, (extended)
GAE, and the clipped value loss (objectives.md §2.10 T-PPO; advantages_rewards.md A6 conventions).

The head reads ``PolicyOutputs.hidden`` [B,T,H], where position t is the hidden state that predicts token t
(the state s_t before y_t), so V(s_t) = head(hidden[:, t]). The bootstrap value of an unfinished response
is V(s_L), the state after its last token: the hidden state at position L.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b, zero-initialised so the first advantages are plain returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """[B,T,H] -> [B,T]."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 1.0,
        bootstrap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over valid tokens, right to left (A6; EGAE of §2.10 with ``bootstrap``).

    delta_t = r_t + gamma*V_next - V_t and A_t = delta_t + gamma*lam*A_next, where V_next / A_next belong to the
    next VALID token (masked tokens are skipped, not zeros), and after the last valid token V_next = bootstrap
    (V(s_L) of an unfinished response; 0 / None for a finished one) and A_next = 0.
    Returns (advantages, returns = advantages + values), both zero on masked positions.
    """
    if token_rewards.shape != values.shape or values.shape != mask.shape:
        raise ValueError(f"gae needs rewards, values and mask of one shape, got {tuple(token_rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    batch, length = values.shape
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    if bootstrap is not None:
        next_value = bootstrap.to(values)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        valid = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
    returns = (advantages + values) * (mask > 0)
    return advantages, returns


def outcome_token_rewards(rewards: Tensor, mask: Tensor, done: Tensor) -> Tensor:
    """r_t = R on the last valid token of a finished response, 0 elsewhere (an unfinished one has no reward yet)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values
    out = torch.zeros_like(mask, dtype=torch.float32)
    rows = ((last >= 0) & done.bool()).nonzero().flatten()
    out[rows, last[rows]] = torch.nan_to_num(rewards.float()[rows], nan=0.0)
    return out


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None = 0.5) -> tuple[Tensor, Tensor]:
    """Per-token 0.5*max((V - Ret)^2, (V_clip - Ret)^2), V_clip = V_old + clip(V - V_old, -c, c) (A6, verl).

    Returns (loss [B,T], clipped [B,T] bool: where the clipped term is the larger). ``clip=None``: unclipped.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
