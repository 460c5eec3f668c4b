"""Group-baseline advantages (advantages_rewards.md A1–A5; policylab.algo.advantages.group_baselines): every
numbered test, plus the edge cases of §0 and the contract (NaN reward = failed sample: excluded from the
statistics, advantage 0; groups need not be contiguous).
"""

from __future__ import annotations

import logging
import math
import statistics

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import discounted_returns
from policylab.testing import make_rollouts

NAN = float("nan")
SEQUENCE_LEVEL = ("grpo", "dr_grpo", "rloo", "lite_ppo")
TOKEN_LEVEL = ("reinforce_pp", "reinforce_pp_baseline")


def make(rewards, group=None, lengths=None, width=None, **fields):
    return make_rollouts(rewards, group=group, lengths=lengths, width=width, **fields)


def adv(name, rollouts, **params):
    return registry.build("advantage", name, params)(rollouts)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol), f"got {actual.tolist()}, expected {expected.tolist()}"


# ---------------------------------------------------------------------------------------------------
# A1 GRPO


def test_A1_T1_grpo_unbiased_std():
    # 0.5 / (sqrt(1/3) + 1e-6); population std would give 1.0, TRL's eps 1e-4 gives 0.865875
    a = 0.866024
    close(adv("grpo", make([1.0, 0.0, 0.0, 1.0])), [a, -a, -a, a], atol=2e-6)


def test_A1_eps_is_a_parameter():
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(adv("grpo", make([1.0, 0.0, 0.0, 1.0]), eps=1e-4), [a, -a, -a, a])


def test_A1_T2_all_equal_is_exactly_zero():
    out = adv("grpo", make([1.0, 1.0, 1.0]))
    assert torch.equal(out, torch.zeros(3))
    out = adv("grpo", make([0.3, 0.3, 0.3, 0.3]))  # not a power of two: must still be exactly 0
    assert torch.equal(out, torch.zeros(4))


def test_A1_T3_groups_are_not_pooled():
    a = 0.707107
    close(adv("grpo", make([1.0, 0.0, 0.2, 0.6], group=[0, 0, 1, 1])), [a, -a, -a, a])


def test_A1_singleton_group_is_r_over_1_plus_eps():
    close(adv("grpo", make([0.7, 1.0, 0.0], group=[4, 9, 9])), [0.7 / (1 + 1e-6), 0.707107, -0.707107])


def test_A1_scale_options():
    r = make([1.0, 0.0, 1.0, 1.0], group=[0, 0, 1, 1])
    close(adv("grpo", r, scale="batch"), [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0, 0])  # batch std 0.5
    close(adv("grpo", r, scale="none"), [0.5, -0.5, 0, 0])
    with pytest.raises(ValueError, match="scale"):
        adv("grpo", r, scale="groups")


# ---------------------------------------------------------------------------------------------------
# A2 Dr. GRPO (the aggregation test T2 is in test_aggregate.py)


def test_A2_T1_dr_grpo():
    close(adv("dr_grpo", make([1.0, 0.0, 0.0, 1.0])), [0.5, -0.5, -0.5, 0.5])


def test_A2_edge_cases():
    assert torch.equal(adv("dr_grpo", make([1.0, 1.0, 1.0, 1.0])), torch.zeros(4))
    close(adv("dr_grpo", make([0.7, 1.0, 0.0], group=[4, 9, 9])), [0.7, 0.5, -0.5])


# ---------------------------------------------------------------------------------------------------
# A3 RLOO


def test_A3_T1_rloo():
    a = 2 / 3
    close(adv("rloo", make([1.0, 0.0, 0.0, 1.0])), [a, -a, -a, a])


def test_A3_T2_rloo_sums_to_zero():
    out = adv("rloo", make([1.0, 0.0, 0.0, 0.0]))
    close(out, [1.0, -1 / 3, -1 / 3, -1 / 3])
    assert abs(float(out.sum())) < 1e-6


def test_A3_singleton_keeps_its_reward():
    close(adv("rloo", make([0.7, 1.0, 0.0], group=[4, 9, 9])), [0.7, 1.0, -1.0])


# ---------------------------------------------------------------------------------------------------
# A4 REINFORCE++ and REINFORCE++-baseline


def test_A4_T1_baseline_token_weighted_batch_whitening():
    r = make([1.0, 0.0, 1.0, 1.0], group=[0, 0, 1, 1], lengths=[2, 1, 1, 1])
    out = adv("reinforce_pp_baseline", r)
    assert out.shape == (4, 2)
    expected = [[0.956183, 0.956183], [-1.434274, 0.0], [-0.239046, 0.0], [-0.239046, 0.0]]
    close(out, expected)


def whiten_by_hand(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values)  # unbiased, as verl's masked_whiten
    return [(v - mean) / math.sqrt(std**2 + 1e-8) for v in values]


def test_A4_T2_kl_in_reward_and_returns():
    # one response, 3 tokens, outcome reward 1 at the last token, k1 = old - ref = [0.1, 0.2, 0.1], beta 0.5
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.1, -1.2, -1.1]])
    r = make([1.0], lengths=[3], old_logp=old, ref_logp=ref)
    token_rewards = torch.tensor([[-0.05, -0.1, 0.95]])
    close(discounted_returns(token_rewards, r.completion_mask, 1.0), [[0.8, 0.85, 0.95]])
    close(adv("reinforce_pp", r, kl_coef=0.5, gamma=1.0), [whiten_by_hand([0.8, 0.85, 0.95])], atol=1e-5)


def test_A4_kl_falls_back_to_behaviour_logp_and_requires_ref():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.1, -1.2, -1.1]])
    with_behaviour = make([1.0], lengths=[3], behavior_logp=old, ref_logp=ref)
    close(adv("reinforce_pp", with_behaviour, kl_coef=0.5), [whiten_by_hand([0.8, 0.85, 0.95])], atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        adv("reinforce_pp", make([1.0], lengths=[3], old_logp=old), kl_coef=0.5)


def test_A4_discounting_and_masked_tokens():
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    close(discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), mask, 0.5), [[0.25, 0.5, 1.0]])
    # a masked middle token passes the running return through and is itself zero
    holed = torch.tensor([[1.0, 0.0, 1.0]])
    close(discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), holed, 0.5), [[0.5, 0.0, 1.0]])


def test_A4_outcome_reward_sits_on_the_last_valid_token():
    # rewards [1, 0] of different lengths, no KL: returns are constant per row -> whitened over 3+1 tokens
    r = make([1.0, 0.0], group=[0, 1], lengths=[3, 1], width=4)
    out = adv("reinforce_pp", r)
    w = whiten_by_hand([1.0, 1.0, 1.0, 0.0])
    close(out, [[w[0], w[1], w[2], 0.0], [w[3], 0.0, 0.0, 0.0]], atol=1e-5)


def test_A4_single_valid_token_falls_back_to_std_one(caplog):
    with caplog.at_level(logging.WARNING):
        out = adv("reinforce_pp_baseline", make([1.0], lengths=[1]))
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros(1, 1))  # x - mean = 0 for the only token
    assert "fewer than 2" in caplog.text


# ---------------------------------------------------------------------------------------------------
# A5 Lite PPO


def test_A5_T1_group_mean_batch_std():
    a = 0.5 / (0.5 + 1e-6)
    close(adv("lite_ppo", make([1.0, 0.0, 1.0, 1.0], group=[0, 0, 1, 1])), [a, -a, 0, 0])


def test_A5_T2_not_group_std():
    a = 0.5 / (1.290994 + 1e-6)
    close(adv("lite_ppo", make([1.0, 0.0, 3.0, 2.0], group=[0, 0, 1, 1])), [a, -a, a, -a])


def test_A5_edge_cases():
    assert torch.equal(adv("lite_ppo", make([1.0, 1.0, 1.0, 1.0], group=[0, 0, 1, 1])), torch.zeros(4))
    # batch of one: std undefined -> r - mu_g with the singleton convention mu := 0
    close(adv("lite_ppo", make([0.7])), [0.7])


# ---------------------------------------------------------------------------------------------------
# shared edge cases for every baseline advantage


@pytest.mark.parametrize("name", SEQUENCE_LEVEL + TOKEN_LEVEL)
def test_non_contiguous_groups_equal_contiguous(name):
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2]
    group = [0, 0, 0, 0, 1, 1, 1, 1]
    lengths = [2, 3, 1, 2, 3, 1, 2, 2]
    perm = [4, 0, 5, 1, 6, 2, 7, 3]  # interleave the two groups
    base = adv(name, make(rewards, group=[g * 7 for g in group], lengths=lengths))
    shuffled = adv(
        name,
        make([rewards[i] for i in perm], group=[[7, 0][group[i] == 0] for i in perm], lengths=[lengths[i] for i in perm]),
    )
    close(shuffled, base[perm])


@pytest.mark.parametrize("name", SEQUENCE_LEVEL + TOKEN_LEVEL)
def test_failed_reward_is_excluded_and_gets_zero(name):
    """A NaN reward (failed reward function) neither shifts the statistics of the others nor gets an advantage."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0]
    group = [0, 0, 0, 1, 1, 1]
    lengths = [2, 1, 3, 1, 2, 2]
    clean = adv(name, make(rewards, group=group, lengths=lengths, width=3))
    failed = adv(name, make(rewards + [NAN], group=group + [0], lengths=lengths + [2], width=3))
    assert torch.isfinite(failed).all(), f"{name}: NaN leaked: {failed}"
    assert torch.all(failed[-1] == 0), f"{name}: the failed row got advantage {failed[-1]}"
    close(failed[:-1], clean)


def test_failed_reward_spec_example_grpo():
    # group [1, NaN, 0, 0]: mean 1/3, unbiased std of [1,0,0] = sqrt(1/3)
    s = math.sqrt(1 / 3)
    close(adv("grpo", make([1.0, NAN, 0.0, 0.0])), [(2 / 3) / (s + 1e-6), 0.0, -(1 / 3) / (s + 1e-6), -(1 / 3) / (s + 1e-6)])
    close(adv("rloo", make([1.0, 0.0, NAN])), [1.0, -1.0, 0.0])


@pytest.mark.parametrize("name", SEQUENCE_LEVEL + TOKEN_LEVEL)
def test_all_failed_or_all_equal_never_nan(name):
    for rewards in ([NAN, NAN, NAN], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]):
        out = adv(name, make(rewards, lengths=[2, 1, 2]))
        assert torch.isfinite(out).all(), f"{name}{rewards}: {out}"
        assert torch.all(out == 0), f"{name}{rewards}: {out}"


@pytest.mark.parametrize("name", SEQUENCE_LEVEL)
def test_g_equal_one_everywhere_is_finite(name):
    out = adv(name, make([1.0, 0.0, 0.5], group=[0, 1, 2]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SEQUENCE_LEVEL + TOKEN_LEVEL)
def test_no_gradient_and_missing_rewards_error(name):
    r = make([1.0, 0.0], lengths=[1, 1])
    r.rewards = r.rewards.requires_grad_(True)
    assert not adv(name, r).requires_grad
    r.rewards = None
    with pytest.raises(ValueError, match="rewards"):
        adv(name, r)


# ---------------------------------------------------------------------------------------------------
# declarations: what each estimator reads, and the recipes that use them chain


def test_declared_requires_follow_the_kl_term():
    from policylab.interfaces import declared

    assert declared(registry.build("advantage", "grpo"), "requires") == ("rewards",)
    assert declared(registry.build("advantage", "reinforce_pp"), "requires") == ("rewards",)
    with_kl = registry.build("advantage", "reinforce_pp", {"kl_coef": 0.1})
    assert set(declared(with_kl, "requires")) == {"rewards", "behavior_logp", "ref_logp"}


@pytest.mark.parametrize("recipe", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "lite_ppo"])
def test_recipes_chain(recipe):
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    build_components(load_recipe(recipe))


def test_reinforce_pp_with_kl_in_reward_gets_the_reference_scorer():
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    parts = build_components(load_recipe("reinforce_pp", {"algorithm.advantage": {"name": "reinforce_pp", "kl_coef": 0.1}}))
    assert parts.plan.needs_reference_model and "ref_logp" in [p for n in parts.plan.prepare for p in n.provides]
