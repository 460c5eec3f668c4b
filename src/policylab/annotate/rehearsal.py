"""DPH-RL's rehearsal term (arXiv:2509.07430): a mass-covering f-divergence to the initial policy π0 on
π0's own solved samples, replayed through the policy with grad in every micro-batch.

The regularizer drives the model itself (the rehearsal forward is part of its loss), so it lives here:
``annotate`` (once per batch, no field) stores solved π0 samples during the first steps, draws this step's
rehearsal set and binds the policy; the call scores that set with the loop's training forward
(:func:`policylab.models.forward.policy_forward`). Bookkeeping and divergences are in ``policylab.algo``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.objectives.policy_gradient import masked_mean
from policylab.algo.regularizers.divergence import DIVERGENCES, alpha_f, f_divergence
from policylab.algo.regularizers.rehearsal import draw, solved_group_samples
from policylab.algo.regularizers.scalar_penalty import check_aggregate, max_len_of, needs_max_len, spread_scalar
from policylab.annotate.token_batches import token_rollouts
from policylab.models.forward import policy_forward
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


@register("regularizer", "dph_rl", spec="arXiv:2509.07430 (seamoke/DPH-RL core_algos js_low_var / alpha_divergence_f)")
class DPHRehearsal:
    """DPH-RL (arXiv:2509.07430): coef·token-mean f(π_θ/π0) over *rehearsal* samples y ~ π0 (forward KL:
    f(u) = u − log u − 1; JS; α-divergence), which keeps probability mass on what π0 solved.

    Rehearsal set (online version of the paper's offline split): during the first ``collect_steps`` steps
    (the policy is still π0 at step 0) every group whose first ``solved_k`` rollouts are all correct stores
    one correct rollout with its π0 log-probs (the engine's behaviour log-probs). Each step draws
    ``rehearsal_batch_size`` of them; every micro-batch runs them through the policy (with grad, at the
    training temperature) and the penalty is spread so the recipe's aggregation (``aggregate``, which
    must name it) adds exactly coef·mean f once per mini-batch. Use it without a reverse-KL term. Not
    done: removing the solved prompts from RL sampling.
    """

    provides = ()

    def __init__(self, divergence: str = "forward_kl", coef: float = 0.01, alpha: float = 0.2, rehearsal_batch_size: int = 4,
                 collect_steps: int = 1, solved_k: int = 4, max_buffer: int = 1024, seed: int = 0,
                 aggregate: str = "token-mean"):
        if divergence not in DIVERGENCES:
            raise ValueError(f"dph_rl divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
        if divergence == "alpha":
            alpha_f(torch.zeros(1), torch.zeros(1), alpha)  # validate now
        self.divergence, self.coef, self.alpha = divergence, coef, alpha
        self.rehearsal_batch_size, self.collect_steps, self.solved_k, self.max_buffer = rehearsal_batch_size, collect_steps, solved_k, max_buffer
        self.aggregate = check_aggregate(aggregate, "dph_rl")
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[dict[str, list]] = []
        self.steps_seen = 0
        self.policy = None
        self.temperature = 1.0
        self.current: list[dict[str, list]] = []

    def requires(self) -> tuple[str, ...]:
        return ("rewards", "behavior_logp") + (("max_new_tokens",) if needs_max_len(self.aggregate) else ())

    def f(self, logp: Tensor, logp0: Tensor) -> Tensor:
        return f_divergence(logp, logp0, self.divergence, self.alpha)

    def collect(self, rollouts: Rollouts) -> int:
        """Add solved prompts of this (π0) batch to the rehearsal buffer; returns how many were added."""
        if rollouts.behavior_logp is None:
            raise ValueError("dph_rl stores π0 log-probs from the engine's behaviour log-probs (rollouts.behavior_logp)")
        added = solved_group_samples(rollouts, rollouts.behavior_logp, self.solved_k, self.max_buffer - len(self.buffer))
        self.buffer += added
        return len(added)

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        if getattr(ctx, "policy", None) is None:
            raise ValueError("dph_rl needs ctx.policy in annotate() for its rehearsal forward passes")
        self.policy, self.temperature = ctx.policy, float(getattr(ctx, "temperature", 1.0))
        if self.steps_seen < self.collect_steps:
            self.collect(rollouts)
        self.steps_seen += 1
        self.current = draw(self.buffer, self.rehearsal_batch_size, self.generator)
        return {}

    def rehearsal_divergence(self) -> Tensor:
        """token-mean f(π_θ/π0) over the drawn rehearsal samples, with grad through the policy."""
        batch = token_rollouts([x["prompt"] for x in self.current], [x["completion"] for x in self.current], 0)
        logp0 = torch.zeros(batch.completion_mask.shape)
        for j, x in enumerate(self.current):
            logp0[j, : len(x["logp0"])] = torch.tensor(x["logp0"])
        logp = policy_forward(self.policy, batch, temperature=self.temperature).logp
        mask = batch.completion_mask.to(logp.device)
        return masked_mean(self.f(logp, logp0.to(logp.device)), mask)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask.to(out.logp.device)
        if not self.current or self.coef == 0:
            return out.logp * 0.0, {"dph/buffer_size": torch.tensor(float(len(self.buffer)))}  # keeps the graph
        if self.policy is None:
            raise ValueError("dph_rl: its annotate(rollouts, ctx) must run first (it binds the policy)")
        divergence = self.rehearsal_divergence().to(out.logp.device)
        penalty = self.coef * divergence
        return spread_scalar(penalty, mask, self.aggregate, max_len_of(batch, self.aggregate)), {
            "dph/rehearsal_divergence": divergence.detach(), "dph/buffer_size": torch.tensor(float(len(self.buffer)))}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "steps_seen": self.steps_seen, "generator": self.generator.get_state(),
                "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.steps_seen, self.current = state["buffer"], state["steps_seen"], state.get("current", [])
        self.generator.set_state(state["generator"])
