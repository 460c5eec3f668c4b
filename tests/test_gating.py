"""G-RA gated reward accumulation (advantages_rewards.md C5, data_agents_eval.md D4)."""

import pytest
import torch

from policylab.registry import build
from policylab.rewards.gating import gated_accumulation, gated_bonus, gated_reward
from policylab.rollouts import Rollouts


def batch(high, components=None, **extras):
    b = len(high)
    return Rollouts(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1),
        completion_ids=torch.zeros(b, 1, dtype=torch.long), completion_mask=torch.ones(b, 1),
        group=torch.zeros(b, dtype=torch.long), truncated=torch.zeros(b, dtype=torch.bool),
        rewards=torch.tensor(high, dtype=torch.float32),
        reward_components={k: torch.tensor(v, dtype=torch.float32) for k, v in (components or {}).items()},
        extras=extras)


def test_c5_t1_closed_gate_gives_the_high_level_reward_only():
    assert gated_accumulation(torch.tensor([0.0]), torch.tensor([3.0]), 1.0, 0.1).item() == 0.0


def test_c5_t2_open_gate_adds_the_weighted_immediate_sum():
    assert gated_accumulation(torch.tensor([1.0]), torch.tensor([3.0]), 1.0, 0.1).item() == pytest.approx(1.3)


def test_c5_t3_monotone_in_high_and_blind_to_immediate_when_closed():
    highs = torch.linspace(-1, 2, 31)
    for immediate in (0.0, 0.5, 3.0):
        values = gated_accumulation(highs, torch.full_like(highs, immediate), 1.0, 0.1)
        assert torch.all(values[1:] >= values[:-1])
    closed = torch.tensor([0.2, 0.2, 0.2])
    assert torch.equal(gated_accumulation(closed, torch.tensor([0.0, 5.0, float("nan")]), 1.0, 0.1), closed)


def test_d4_swe_setting():
    immediate = torch.tensor([2.0, 2.0])  # [0.1] * 20 each
    values = gated_accumulation(torch.tensor([-0.5, 1.0]), immediate, threshold=0.0, weight=1.0)
    assert values.tolist() == pytest.approx([-0.5, 3.0])


def test_stage_reads_named_immediate_components():
    rollouts = batch([1.0, 0.0, 1.0], {"format": [1.0, 1.0, 0.0], "tool_ok": [2.0, 2.0, 1.0]})
    delta, metrics = build("reward_shaping", "gated_reward", {"immediate": ("format", "tool_ok")})(rollouts)
    assert delta.tolist() == pytest.approx([0.3, 0.0, 0.1])
    assert metrics["gra/gate_open_frac"] == pytest.approx(2 / 3)
    assert metrics["gra/immediate_sum_closed"] == pytest.approx(3.0)


def test_stage_reads_per_turn_lists_and_leaves_failed_samples_alone():
    rollouts = batch([1.0, float("nan"), 1.0], turn_rewards=[[0.1] * 20, [5.0], []])
    delta, _ = gated_reward(rollouts, threshold=0.0, weight=1.0)
    assert delta.tolist() == pytest.approx([2.0, 0.0, 0.0])
    assert gated_bonus(torch.tensor([1.0]), torch.tensor([float("nan")]), 1.0, 0.1).isnan().all()


def test_stage_names_what_is_missing():
    with pytest.raises(KeyError, match="'format'"):
        gated_reward(batch([1.0]), immediate=("format",))
    with pytest.raises(KeyError, match="turn_rewards"):
        gated_reward(batch([1.0]))
    with pytest.raises(KeyError, match="'outcome'"):
        gated_reward(batch([1.0], turn_rewards=[[1.0]]), high_component="outcome")
