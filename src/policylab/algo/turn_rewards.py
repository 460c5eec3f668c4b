"""Where multi-turn rewards sit on the response tokens (data_agents_eval.md D0, "Reward placement").

Pure functions of per-turn lists; the agent engine (rollout/agent.py) records their results.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_turn_rewards(increments: list[float], success: bool, max_total_reward: float) -> list[float]:
    """Turn-level (dense) rewards Delta_k / Z, meow-tea-taro's ``agentic_verified`` rule (D0): Z = the number
    of positive increments if the episode succeeded, else ``max_total_reward``; so a won game whose scoring
    events are worth one point each sums to 1, and a lost game earns its share of the maximum score.
    Z = 0 (a won game without a positive increment) gives zeros."""
    if success:
        z = float(sum(1 for d in increments if d > 0))
    else:
        z = float(max_total_reward)
    if z <= 0:
        return [0.0 for _ in increments]
    return [float(d) / z for d in increments]


def place_turn_rewards(turn_end_positions: list[list[int]], turn_rewards: list[list[float]], width: int) -> Tensor:
    """[B, width] float: turn k's reward on its turn-end token (the separator that closed action k); turn
    ends at or beyond ``width`` (cut by truncation) are dropped with their rewards, as D0 prescribes."""
    out = torch.zeros(len(turn_end_positions), width, dtype=torch.float32)
    for row, (ends, rewards) in enumerate(zip(turn_end_positions, turn_rewards)):
        if len(ends) != len(rewards):
            raise ValueError(f"row {row}: {len(ends)} turn ends but {len(rewards)} turn rewards")
        for end, reward in zip(ends, rewards):
            if 0 <= end < width:
                out[row, end] += reward
    return out


def sparse_turn_rewards(num_turns: int, final_reward: float) -> list[float]:
    """The trajectory (sparse) reward as a per-turn list: ``final_reward`` on the last turn, 0 before."""
    return [0.0] * max(num_turns - 1, 0) + ([float(final_reward)] if num_turns else [])
