"""G-RA gated reward accumulation (advantages_rewards.md C5, data_agents_eval.md D4).

Immediate (step-level, rule-verified) rewards are credited only to episodes whose high-level outcome
reaches a threshold, so a policy cannot farm them while missing the goal. Direct accumulation
(D-RA, no gate) is the ablation that collapses.

Wiring: list the immediate rewards under ``rewards:`` with weight 0 (they are still computed and kept,
unweighted, in ``rollouts.reward_components``), so that ``rollouts.rewards`` is the high-level reward;
this stage then adds ``1[R_high ≥ τ]·w·Σ r_imm``. Multi-turn engines may instead put per-turn
immediate rewards in ``rollouts.extras["turn_rewards"]`` (one list per completion).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.fields import declare_field
from policylab.registry import register

# Written by a multi-turn rollout engine (one list of per-turn immediate rewards per completion); no
# engine in this tree writes it yet, so gated_reward with per-turn lists needs such an engine.
declare_field("turn_rewards", per_row=True, shape="list[B]", owner="multi-turn rollout engine",
              doc="per completion, the list of immediate (per-turn) rewards")
from policylab.rollouts import Rollouts


def gated_bonus(high: Tensor, immediate_sum: Tensor, threshold: float, weight: float) -> Tensor:
    """1[R_high ≥ τ]·w·Σ_t r^imm_t. A closed gate (R_high below τ, or NaN: a failed sample) ignores
    the immediate rewards entirely, even NaN ones; an open gate passes a NaN sum through."""
    gate = high >= threshold  # False for NaN
    return torch.where(gate, weight * immediate_sum, torch.zeros_like(immediate_sum))


def gated_accumulation(high: Tensor, immediate_sum: Tensor, threshold: float, weight: float) -> Tensor:
    """C5: R = R_high + 1[R_high ≥ τ]·w·Σ_t r^imm_t."""
    return high + gated_bonus(high, immediate_sum, threshold, weight)


def _immediate_sum(rollouts: Rollouts, immediate: tuple[str, ...], turn_rewards_key: str) -> Tensor:
    if immediate:
        missing = [name for name in immediate if name not in rollouts.reward_components]
        if missing:
            raise KeyError(f"gated_reward: immediate reward(s) {missing} not in rollouts.reward_components "
                           f"(have {sorted(rollouts.reward_components)}); list them under rewards: with weight 0")
        return torch.stack([rollouts.reward_components[name].float() for name in immediate]).sum(0)
    if turn_rewards_key not in rollouts.extras:
        raise KeyError(f"gated_reward needs immediate=(reward names) or rollouts.extras[{turn_rewards_key!r}]")
    turns = rollouts.extras[turn_rewards_key]
    if isinstance(turns, Tensor):
        return turns.float().reshape(rollouts.batch_size, -1).nansum(-1) if turns.dim() > 1 else turns.float()
    if len(turns) != rollouts.batch_size:
        raise ValueError(f"gated_reward: extras[{turn_rewards_key!r}] has {len(turns)} entries for "
                         f"{rollouts.batch_size} completions")
    return torch.tensor([float(sum(t)) for t in turns], dtype=torch.float32)


@register("reward_shaping", "gated_reward", spec="advantages_rewards.md C5; data_agents_eval.md D4")
def gated_reward(rollouts: Rollouts, *, immediate: tuple[str, ...] = (), threshold: float = 1.0, weight: float = 0.1,
                 high_component: str | None = None, turn_rewards_key: str = "turn_rewards") -> tuple[Tensor, dict]:
    """G-RA: add ``1[R_high ≥ threshold]·weight·Σ r_imm`` to each reward.

    R_high is ``rollouts.rewards`` (or the named component ``high_component``); the immediate rewards
    are the named components ``immediate`` summed, or per-turn lists in ``extras[turn_rewards_key]``.
    Reconstructed (C5): τ = 1 for a binary outcome and w = 0.1 are its defaults; D4's SWE setting is
    threshold=0 (a non-empty patch), weight=1. Per-turn placement of the gated rewards is the
    multi-turn engine's business; for outcome-level advantages only their gated sum matters.
    """
    if high_component is not None:
        if high_component not in rollouts.reward_components:
            raise KeyError(f"gated_reward: high_component {high_component!r} not in rollouts.reward_components "
                           f"(have {sorted(rollouts.reward_components)})")
        high = rollouts.reward_components[high_component].float()
    elif rollouts.rewards is None:
        raise ValueError("gated_reward runs after the rewards: rollouts.rewards is None")
    else:
        high = rollouts.rewards.float()
    immediate_sum = _immediate_sum(rollouts, tuple(immediate), turn_rewards_key)
    delta = gated_bonus(high, immediate_sum, threshold, weight)
    gate = high >= threshold
    closed = ~gate
    metrics = {
        "gra/gate_open_frac": float(gate.float().mean()),
        "gra/immediate_sum_open": float(immediate_sum[gate].mean()) if gate.any() else 0.0,
        "gra/immediate_sum_closed": float(immediate_sum[closed].mean()) if closed.any() else 0.0,
    }
    return delta, metrics
