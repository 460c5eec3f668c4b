"""T-PPO (objectives.md §2.10): PPO-clip on the tokens of the current generation window, with advantages from an
extended GAE that bootstraps unfinished responses from a critic, and a critic trained on finished responses only.

Here the window is the whole completion: a response cut at max_new_tokens (``rollouts.truncated``) is treated as
an unfinished window when ``truncated_as_window`` is on (its reward is ignored and its advantage bootstraps from
V(s_L)); an engine that generates in windows marks finished rows in ``rollouts.extras["window_done"]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages import masked_whiten
from policylab.algo.objectives import masked_mean, ppo_clip_loss
from policylab.algo.objectives_ratio._shared import require_rewards
from policylab.algo.value import ValueHead, clipped_value_loss, gae, outcome_token_rewards
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

VALUES_KEY, BOOTSTRAP_KEY, DONE_KEY, RETURNS_KEY = "value/values", "value/bootstrap", "value/done", "value/returns"


def _last_valid_index(mask: Tensor) -> Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values


@register("advantage", "egae", spec="objectives.md §2.10 (EGAE); advantages_rewards.md A6")
@torch.no_grad()
def egae_advantage(rollouts: Rollouts, *, gamma: float = 1.0, lam: float = 0.95, whiten: bool = False) -> Tensor:
    """Extended GAE (§2.10): GAE over the observed tokens, bootstrapping unfinished responses from V(s_T).

    Finished rows: r = R on the last token and V(s_T) = 0; unfinished rows: r = 0 and V(s_T) = the critic's
    bootstrap. Reads the critic's estimates from ``rollouts.extras`` (written by the ``t_ppo`` objective's
    ``prepare``). ``whiten`` applies A6's batch whitening (off by default: the spec's T-PPO has none).
    """
    for key in (VALUES_KEY, BOOTSTRAP_KEY, DONE_KEY):
        if key not in rollouts.extras:
            raise ValueError(f"egae needs critic values in rollouts.extras[{key!r}]; use it with the t_ppo objective, "
                             "whose prepare hook writes them")
    mask = rollouts.completion_mask
    done = rollouts.extras[DONE_KEY].bool()
    rewards = outcome_token_rewards(require_rewards(rollouts, "egae"), mask, done)
    values = rollouts.extras[VALUES_KEY].float()
    bootstrap = torch.where(done, torch.zeros_like(rollouts.extras[BOOTSTRAP_KEY]), rollouts.extras[BOOTSTRAP_KEY]).float()
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap=bootstrap)
    return masked_whiten(advantages, mask) if whiten else advantages


class TPPO:
    """T-PPO (objectives.md §2.10): PPO-clip policy loss + clipped value loss on finished responses.

    Owns a linear ``ValueHead`` on the policy's last hidden states and its own Adam optimizer, so the loop only
    has to honour the component hooks: ``prepare`` scores the batch with hidden states and writes V(s_t), the
    bootstrap V(s_L), the finished flags and the critic targets (lambda_critic-returns) into ``rollouts.extras``
    for the ``egae`` advantage; the call adds ``value_coef * 0.5*max((V-Ret)^2, (V_clip-Ret)^2)`` on finished
    rows to the policy loss (the head sees detached hidden states unless ``value_trunk_grad``); ``after_step``
    steps the head's optimizer. Without critic targets in the batch (no ``prepare``) only the policy loss is
    returned. Reconstructed; defaults are the spec's guesses (gamma 1, lambda_critic 1, eps 0.2, A6's c_v 0.5
    and critic lr 1e-5).
    """

    needs_hidden = True

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip_c: float | None = None,
                 value_coef: float = 1.0, value_clip: float | None = 0.5, value_lr: float = 1e-5, gamma: float = 1.0,
                 lambda_critic: float = 1.0, truncated_as_window: bool = True, value_trunk_grad: bool = False):
        self.clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
        self.value_coef, self.value_clip, self.value_lr = value_coef, value_clip, value_lr
        self.gamma, self.lambda_critic = gamma, lambda_critic
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

    def done_flags(self, rollouts: Rollouts) -> Tensor:
        if "window_done" in rollouts.extras:
            return torch.as_tensor(rollouts.extras["window_done"]).bool()
        if self.truncated_as_window:
            return ~rollouts.truncated.bool()
        return torch.ones_like(rollouts.truncated, dtype=torch.bool)

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        mask = rollouts.completion_mask
        # one extra column so position L (the state after the last token) is scored for every row
        last = _last_valid_index(mask)
        ext_ids = torch.cat([rollouts.completion_ids, rollouts.completion_ids[:, -1:]], dim=1)
        ext_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
        ext_mask[torch.arange(mask.shape[0]), last + 1] = 1
        scored = ctx.score(rollouts.with_(completion_ids=ext_ids, completion_mask=ext_mask), with_hidden=True)
        hidden = scored.hidden.detach()
        head = self._ensure_head(hidden.shape[-1], getattr(ctx, "device", None) or hidden.device)
        with torch.no_grad():  # the head lives beside the policy; the batch's tensors stay where they are
            values_ext = head(hidden.to(head.linear.weight.device)).float().to(mask.device)
        done = self.done_flags(rollouts).to(mask.device)
        values = values_ext[:, : mask.shape[1]] * mask
        bootstrap = torch.where(done, torch.zeros_like(last, dtype=values.dtype), values_ext[torch.arange(mask.shape[0]), last + 1])
        rewards = outcome_token_rewards(require_rewards(rollouts, "t_ppo"), mask, done)
        _, returns = gae(rewards, values, mask, gamma=self.gamma, lam=self.lambda_critic, bootstrap=bootstrap)
        extras = {**rollouts.extras, VALUES_KEY: values, BOOTSTRAP_KEY: bootstrap, DONE_KEY: done, RETURNS_KEY: returns}
        return rollouts.with_(extras=extras)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        loss, metrics = ppo_clip_loss(out, batch, **self.clip)
        if RETURNS_KEY not in batch.extras:
            return loss, metrics
        if out.hidden is None:
            raise ValueError("t_ppo needs PolicyOutputs.hidden to train its value head (needs_hidden = True)")
        mask = batch.completion_mask
        hidden = out.hidden if self.value_trunk_grad else out.hidden.detach()
        values = self._ensure_head(hidden.shape[-1], hidden.device)(hidden)
        old_values = batch.extras[VALUES_KEY].to(values)
        returns = batch.extras[RETURNS_KEY].to(values)
        finished = batch.extras[DONE_KEY].to(values)[:, None] * mask
        value_loss, clipped = clipped_value_loss(values, old_values, returns, self.value_clip)
        loss = loss + self.value_coef * value_loss * finished
        metrics["value/loss"] = masked_mean(value_loss.detach(), finished)
        metrics["value/clipfrac"] = masked_mean(clipped.float(), finished)
        metrics["value/mean"] = masked_mean(values.detach(), mask)
        metrics["value/finished_frac"] = batch.extras[DONE_KEY].float().mean()
        return loss, metrics

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


register("objective", "t_ppo", spec="objectives.md §2.10")(TPPO)
