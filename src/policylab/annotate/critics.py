"""Critics trained beside the policy: T-PPO's value head (arXiv:2506.15050) on the policy's last hidden states.

The registered ``t_ppo`` objective owns the head and its optimizer. Its ``annotate`` hook runs one no-grad
``ctx.score(..., with_hidden=True)`` pass over the batch (one position past each completion's end, for the
bootstrap V(s_L)) and provides the critic's estimates as declared per-row fields; its call adds the value loss
(on the training forward's hidden states) to PPO-clip; ``after_step`` steps the head's optimizer. The math —
GAE, the clipped value loss — is policylab/algo/advantages/extended_gae.py and policylab/algo/objectives/truncated_ppo.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policylab.algo.advantages.extended_gae import (
    CRITIC_BOOTSTRAP,
    CRITIC_RETURNS,
    CRITIC_VALUES,
    RESPONSE_FINISHED,
    finished_token_rewards,
    gae,
)
from policylab.algo.objectives.truncated_ppo import tppo_loss
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

_OWNER = "objective 't_ppo'"
declare_field(CRITIC_VALUES, per_row=True, shape="[B,T]", dtype="float", owner=_OWNER,
              doc="V(s_t) of the critic at collection time, s_t the state before completion token t (0 on padding)")
declare_field(CRITIC_BOOTSTRAP, per_row=True, shape="[B]", dtype="float", owner=_OWNER,
              doc="V(s_L) of an unfinished response (the state after its last token); 0 for a finished one")
declare_field(RESPONSE_FINISHED, per_row=True, shape="[B]", dtype="bool", owner=_OWNER,
              doc="the response ended, so its reward is final (with truncated_as_window, truncated rows are unfinished)")
declare_field(CRITIC_RETURNS, per_row=True, shape="[B,T]", dtype="float", owner=_OWNER,
              doc="the critic's regression targets: lambda_critic-returns of the (extended) GAE")


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state h_t, zero-initialised so the first advantages are
    plain returns. ``hidden[:, t]`` is the state that predicts token t (the state s_t before y_t)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """[B,T,H] -> [B,T]."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def _last_valid_index(mask: Tensor) -> Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values


def with_state_after_end(rollouts: Rollouts) -> Rollouts:
    """The batch with one more completion column, marked valid at each row's position L (just past its last
    token), so a teacher-forced scoring pass also yields the state s_L after the completion."""
    mask = rollouts.completion_mask
    last = _last_valid_index(mask)
    ext_ids = torch.cat([rollouts.completion_ids, rollouts.completion_ids[:, -1:]], dim=1)
    ext_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    ext_mask[torch.arange(mask.shape[0]), last + 1] = 1
    return rollouts.with_(completion_ids=ext_ids, completion_mask=ext_mask)


class TPPO:
    """T-PPO (arXiv:2506.15050, Truncated Proximal Policy Optimization; reconstructed from the abstract): PPO-clip
    on the policy with advantages from an extended GAE that bootstraps unfinished responses from a critic, plus
    a clipped value loss that trains the critic on finished responses only,
    l = PPO-clip + value_coef * 0.5*max((V-Ret)^2, (V_clip-Ret)^2) on finished rows.

    Here the generation window is the whole completion: a response cut at max_new_tokens (``rollouts.truncated``)
    is an unfinished window when ``truncated_as_window`` is on (its reward is ignored and its advantage bootstraps
    from V(s_L)); with it off every response is finished, which is plain PPO with a GAE critic (recipe ppo_gae).

    Owns a linear ``ValueHead`` on the policy's last hidden states and its own Adam optimizer. ``annotate``
    (``requires`` the rewards) scores the batch with hidden states and provides V(s_t) (``critic_values``
    [B,T]), the bootstrap V(s_L) (``critic_bootstrap`` [B]), the finished flags (``response_finished`` [B]) and the
    critic targets, lambda_critic-returns (``critic_returns`` [B,T]), for the ``egae``/``gae`` advantages; the call
    adds the value loss (the head sees detached hidden states unless ``value_trunk_grad``); ``after_step`` steps
    the head's optimizer. Without critic targets in the batch only the policy loss is returned. Defaults are
    guesses (gamma 1, lambda_critic 1, eps 0.2, c_v 0.5, critic lr 1e-5).
    """

    needs_hidden = True
    requires = ("rewards",)
    provides = (CRITIC_VALUES, CRITIC_BOOTSTRAP, RESPONSE_FINISHED, CRITIC_RETURNS)

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip_c: float | None = None,
                 value_coef: float = 1.0, value_clip: float | None = 0.5, value_lr: float = 1e-5, gamma: float = 1.0,
                 lambda_critic: float = 1.0, truncated_as_window: bool = True, value_trunk_grad: bool = False):
        self.loss_params = dict(eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, value_coef=value_coef,
                                value_clip=value_clip)
        self.value_lr, self.gamma, self.lambda_critic = value_lr, gamma, lambda_critic
        self.truncated_as_window, self.value_trunk_grad = truncated_as_window, value_trunk_grad
        self.head: ValueHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None

    def _ensure_head(self, hidden_size: int, device) -> ValueHead:
        if self.head is None:
            self.head = ValueHead(hidden_size).to(device)
            self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.value_lr)
            if self._pending_state is not None:
                self.load_state_dict(self._pending_state)
        return self.head

    def finished(self, rollouts: Rollouts) -> Tensor:
        if self.truncated_as_window:
            return ~rollouts.truncated.bool()
        return torch.ones_like(rollouts.truncated, dtype=torch.bool)

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict[str, Tensor]:
        mask = rollouts.completion_mask
        last = _last_valid_index(mask)
        hidden = ctx.score(with_state_after_end(rollouts), with_hidden=True).hidden.detach()
        head = self._ensure_head(hidden.shape[-1], getattr(ctx, "device", None) or hidden.device)
        # the head lives beside the policy; the batch's tensors stay where they are
        values_ext = head(hidden.to(head.linear.weight.device)).float().to(mask.device)
        finished = self.finished(rollouts).to(mask.device)
        values = values_ext[:, : mask.shape[1]] * mask
        bootstrap = torch.where(finished, torch.zeros_like(last, dtype=values.dtype),
                                values_ext[torch.arange(mask.shape[0]), last + 1])
        rewards = finished_token_rewards(rollouts, finished)
        _, returns = gae(rewards, values, mask, gamma=self.gamma, lam=self.lambda_critic, bootstrap=bootstrap)
        return {CRITIC_VALUES: values, CRITIC_BOOTSTRAP: bootstrap, RESPONSE_FINISHED: finished, CRITIC_RETURNS: returns}

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        values = None
        if CRITIC_RETURNS in batch.extras:
            if out.hidden is None:
                raise ValueError("t_ppo needs PolicyOutputs.hidden to train its value head (needs_hidden = True)")
            hidden = out.hidden if self.value_trunk_grad else out.hidden.detach()
            values = self._ensure_head(hidden.shape[-1], hidden.device)(hidden)
        return tppo_loss(out, batch, values, **self.loss_params)

    def after_step(self, metrics: dict | None = None) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.head is None:  # the head is built lazily when the hidden size is known
            self._pending_state = state
            return
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending_state = None


register("objective", "t_ppo", spec="arXiv:2506.15050 (T-PPO; reconstructed from the abstract)")(TPPO)
