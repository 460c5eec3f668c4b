"""ETR and HAPO (policylab/algo/objectives/adaptive_clipping.py) and HAPO's advantage
(policylab/algo/advantages/token_level_group.py): the spec's numbers and property tests."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.advantages.token_level_group import hapo_advantage
from policylab.algo.logits_transforms import entropy_temperature_factor
from policylab.algo.objectives.adaptive_clipping import (
    HapoEntropyStats,
    etr_clip_ranges,
    group_population_variance,
    hapo_adaptive_clip,
    hapo_normalised_entropy,
    hapo_redistributed_advantage,
)
from policylab.rollouts import PolicyOutputs
from test_objectives_ratio_common import aggregate, annotated, grad_of, log_of, make_batch, random_rollouts


def run(name, batch, leaf, entropy=None, **params):
    return registry.build("objective", name, params)(PolicyOutputs(logp=leaf, entropy=entropy), batch)


# ---------------------------------------------------------------------------------------------------
# ETR


def test_etr_elastic_ranges_numbers():
    kw = dict(eps0_low=0.2, eps0_high=0.2, alpha=0.5, beta=0.5, adv_cap=3.0, var_max=0.25)
    _, high = etr_clip_ranges(torch.tensor([2.0]), torch.tensor([0.25]), **kw)  # p = 0.5
    assert float(high) == pytest.approx(0.4, abs=1e-6)
    _, high = etr_clip_ranges(torch.tensor([0.1]), torch.tensor([0.09]), **kw)  # p = 0.9
    assert float(high) == pytest.approx(0.2 * (1 + 0.5 * 0.1 / 3) * 1.18, abs=1e-6)
    assert float(high) == pytest.approx(0.2399, abs=1e-4)
    low, _ = etr_clip_ranges(torch.tensor([2.0]), torch.tensor([0.25]), **kw, sides="high_only")
    assert float(low) == pytest.approx(0.2)
    low, _ = etr_clip_ranges(torch.tensor([9.0]), torch.tensor([0.25]), **{**kw, "eps0_low": 0.5})
    assert float(low) == pytest.approx(0.9)  # capped
    assert torch.allclose(group_population_variance(torch.tensor([1.0, 1.0, 0.0, 0.0, 5.0]), torch.tensor([0, 0, 0, 0, 1])),
                          torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))


def test_etr_widens_for_large_advantages_in_the_learning_zone():
    # rho = 1.25 everywhere; row 0: A = +2 in a p = 0.5 group; row 1: A = +0.1 in a p = 0.9 group
    rewards = [1.0, 1.0, 0.0, 0.0] + [1.0] * 9 + [0.0]
    group = [0] * 4 + [1] * 10
    adv = [2.0, 0.0, 0.0, 0.0] + [0.1] + [0.0] * 9
    batch, leaf = make_batch([[0.0]] * 14, log_of([[1.25]] * 14), adv, rewards=rewards, group=group)
    g = grad_of(run("etr", batch, leaf)[0].sum(), leaf)
    assert float(g[0, 0]) == pytest.approx(-2.0 * 1.25)  # eps_high 0.4: unclipped
    assert float(g[4, 0]) == 0.0  # eps_high 0.2399: clipped


def test_etr_without_elasticity_is_ppo_clip_and_zero_advantage_groups_stay_silent():
    batch, logp = random_rollouts(off_policy=0.4)
    leaf, ppo_leaf = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    total = aggregate(run("etr", batch, leaf, alpha=0.0, beta=0.0)[0], batch)
    ppo_total = aggregate(run("ppo_clip", batch, ppo_leaf)[0], batch)
    assert torch.allclose(total, ppo_total) and torch.allclose(grad_of(total, leaf), grad_of(ppo_total, ppo_leaf))
    batch, leaf = make_batch([[0.0, 0.0]] * 2, log_of([[1.5, 0.6]] * 2), None, rewards=[1.0, 1.0])
    batch.advantages = grpo_advantage(batch)
    assert torch.all(grad_of(run("etr", batch, leaf, alpha=5.0, beta=5.0)[0].sum(), leaf) == 0)


def test_etr_annotate_provides_the_whole_batch_group_variance():
    batch, leaf = make_batch([[0.0]] * 4, log_of([[1.3]] * 4), [2.0, -2.0, 0.5, -0.5], rewards=[1.0, 0.0, 1.0, 1.0],
                             group=[0, 0, 1, 1])
    objective = registry.build("objective", "etr")
    prepared = annotated(objective, batch)
    assert torch.allclose(prepared.extras["etr_group_reward_var"], torch.tensor([0.25, 0.25, 0.0, 0.0]))
    alone = prepared.select([0])  # one row of a group: without the annotation its group variance would be 0
    loss, _ = objective(PolicyOutputs(logp=leaf[:1]), alone)
    full, _ = objective(PolicyOutputs(logp=leaf), batch)
    assert torch.allclose(loss, full[:1])


def test_etr_needs_rewards():
    batch, leaf = make_batch([[0.0]], [[0.0]], [1.0])
    with pytest.raises(ValueError, match="rewards"):
        run("etr", batch, leaf)


# ---------------------------------------------------------------------------------------------------
# HAPO


H_EXAMPLE = torch.tensor([[0.05, 0.2, 0.5, 1.0, 2.0]])


def test_hapo_normalised_entropy_and_adaptive_clip_numbers():
    mask = torch.ones(1, 5)
    h_hat = hapo_normalised_entropy(H_EXAMPLE, mask, 0.8)
    assert torch.allclose(h_hat, torch.tensor([[-1.0, -0.537244, -0.231378, 0.0, 1.0]]), atol=1e-5)
    low, high = hapo_adaptive_clip(h_hat, 0.2, 0.2, 1.0)
    assert torch.allclose(low, torch.tensor([[0.4, 0.307449, 0.246276, 0.2, 0.2]]), atol=1e-5)
    assert torch.allclose(high, torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.4]]), atol=1e-5)
    compat = hapo_normalised_entropy(H_EXAMPLE, mask, 0.8, code_compat=True)
    assert torch.allclose(compat, torch.tensor([[1.0, 0.537244, 0.231378, 0.0, 1.0]]), atol=1e-5)


def test_hapo_normalised_entropy_ignores_padding():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    padded = torch.cat([H_EXAMPLE, torch.tensor([[50.0, 1e-9]])], dim=1)
    h_hat = hapo_normalised_entropy(padded, mask, 0.8)
    assert torch.allclose(h_hat[:, :5], hapo_normalised_entropy(H_EXAMPLE, torch.ones(1, 5), 0.8))
    assert torch.all(h_hat[:, 5:] == 0)


def test_hapo_token_level_group_average_numbers():
    def adv(rewards, lengths):
        mask = torch.zeros(len(rewards), max(lengths))
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        batch, _ = make_batch(torch.zeros_like(mask).tolist(), mask=mask, rewards=rewards)
        return hapo_advantage(batch)

    assert torch.allclose(adv([1.0, 0.0], [1, 3]), torch.tensor([1.732051, -0.577350]), atol=1e-5)
    assert torch.allclose(adv([1.0, 0.0], [3, 1]), torch.tensor([0.577350, -1.732051]), atol=1e-5)
    assert torch.allclose(adv([1.0, 0.0], [99, 1]), torch.tensor([0.707107, -0.707107]), atol=1e-5)  # fallback
    assert torch.all(adv([1.0, 1.0, 1.0], [2, 3, 4]) == 0)
    assert torch.allclose(adv([1.0, float("nan"), 0.0], [2, 2, 2]), torch.tensor([1.0, 0.0, -1.0]), atol=1e-5)


def test_hapo_redistribution_neutral_zone():
    adv = torch.ones(2)
    ratio = torch.tensor([1.0, 1.15])
    low, high = torch.full((2,), 0.2), torch.full((2,), 0.3)  # N = (0.9, 1.15), open
    out = hapo_redistributed_advantage(adv, torch.full((2,), 0.5), ratio, low, high, beta=1.0)
    assert torch.allclose(out, torch.tensor([1.0, 1.5]))
    out = hapo_redistributed_advantage(adv, torch.full((2,), -0.5), ratio, low, high, beta=1.0)
    assert torch.allclose(out, torch.tensor([0.5, 1.0]))


def test_hapo_without_adaptivity_is_dual_clip_ppo_and_its_advantage_is_population_grpo():
    batch, logp = random_rollouts(off_policy=0.4)
    leaf, ppo_leaf = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    total = aggregate(run("hapo", batch, leaf, entropy=batch.entropy, clip_alpha=0.0, adv_beta=0.0)[0], batch)
    ppo_total = aggregate(run("ppo_clip", batch, ppo_leaf, dual_clip_c=10.0)[0], batch)
    assert torch.allclose(total, ppo_total) and torch.allclose(grad_of(total, leaf), grad_of(ppo_total, ppo_leaf))
    equal_lengths, _ = make_batch([[0.0] * 3] * 4, rewards=[1.0, 0.0, 0.0, 0.5], group=[0, 0, 1, 1])
    population = grpo_advantage(equal_lengths, eps=0.0) * math.sqrt(2)  # G = 2: unbiased std = sqrt(2) * population
    assert torch.allclose(hapo_advantage(equal_lengths, eps=0.0), population, atol=1e-6)


def test_hapo_low_entropy_tokens_train_with_a_damped_advantage_on_policy():
    """The documented reason for its skip:T-ONPOL tag."""
    batch, leaf = make_batch([[-1.0] * 5], None, [1.0])
    g = grad_of(run("hapo", batch, leaf, entropy=H_EXAMPLE)[0].sum(), leaf)
    h_hat = torch.tensor([-1.0, -0.537244, -0.231378, 0.0, 1.0])
    expected = -torch.where(h_hat <= 0, 1 + h_hat, torch.ones(5))
    assert torch.allclose(g[0], expected, atol=1e-5)
    compat = grad_of(run("hapo", batch, leaf, entropy=H_EXAMPLE, hapo_code_compat=True)[0].sum(), leaf)
    assert torch.allclose(compat[0], -torch.ones(5))


def test_hapo_sampling_temperature_rule():
    stats = HapoEntropyStats(pivot=0.0, rms=1.0, pos_max=2.0, neg_min=-2.0)
    vocab = 50
    flat = torch.zeros(1, vocab)  # entropy log(50) = 3.91: log H = 1.364 -> h^ = 0.68
    peaked = torch.tensor([[30.0] + [0.0] * (vocab - 1)])  # entropy ~ 0 -> log clamps at log 1e-6 -> h^ = -1
    def temperature(logits, base):  # T_t = T0 * (1 + tau*h^)
        return base * entropy_temperature_factor(logits, tau=0.05, **asdict(stats))

    expected_h = math.log(math.log(vocab)) / (1 + 1e-6) / 2.0
    assert float(temperature(flat, 1.0)) == pytest.approx(1 + 0.05 * expected_h, rel=1e-5)
    assert float(temperature(peaked, 0.7)) == pytest.approx(0.7 * 0.95, rel=1e-5)
    assert registry.build("objective", "hapo").sampling_transforms() == ()  # first step: T0


def test_hapo_annotate_feeds_the_sampling_transform():
    from policylab.algo.logits_transforms import apply_transforms

    objective = registry.build("objective", "hapo")
    assert objective.sampling_transforms() == ()  # no statistics before the first batch: factor 1
    batch, leaf = make_batch([[0.0] * 5], [[0.0] * 5], [1.0], entropy=H_EXAMPLE)
    annotated(objective, batch)  # provides no field: it only refreshes the statistics
    (transform,) = objective.sampling_transforms()
    stats = objective.stats
    assert transform.kind == "entropy_temperature" and transform.params["tau"] == pytest.approx(0.05)
    assert stats.pivot == pytest.approx(0.0) and stats.rms == pytest.approx(1.582758, abs=1e-5)
    scores = torch.zeros(2, 50)
    processed, factors = apply_transforms(scores.clone() + 1.0, [transform])
    factor = float(entropy_temperature_factor(scores, tau=0.05, **asdict(stats))[0])
    assert torch.allclose(processed, (scores + 1.0) / factor) and torch.allclose(factors, torch.full((2,), factor))
    batch.extras["sampling_temperature_factor"] = torch.tensor([factor])  # what the rollout engine reports
    _, metrics = objective(PolicyOutputs(logp=leaf, entropy=H_EXAMPLE), batch)
    assert float(metrics["hapo/sampling_temperature_factor"]) == pytest.approx(factor)
    restored = registry.build("objective", "hapo")
    restored.load_state_dict(objective.state_dict())
    assert restored.stats == stats and restored.sampling_transforms() == objective.sampling_transforms()
    off = registry.build("objective", "hapo", {"temperature_tau": 0.0})
    annotated(off, batch)
    assert off.sampling_transforms() == ()


def test_hapo_needs_entropy():
    batch, leaf = make_batch([[0.0]], [[0.0]], [1.0])
    with pytest.raises(ValueError, match="entropies"):
        run("hapo", batch, leaf)
