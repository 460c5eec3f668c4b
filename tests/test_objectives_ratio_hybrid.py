"""DHPO, MinPRO and FiberPO (policylab/algo/objectives/sequence_ratios.py): the spec's numbers and property tests."""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.algo.objectives.sequence_ratios import censor_gate, dhpo_mixed_ratios, prefix_min_ratio
from policylab.rollouts import PolicyOutputs
from test_objectives_ratio_common import aggregate, annotated, grad_of, log_of, make_batch, random_rollouts


def run(name, batch, leaf, entropy=None, **params):
    return registry.build("objective", name, params)(PolicyOutputs(logp=leaf, entropy=entropy), batch)


# ---------------------------------------------------------------------------------------------------
# DHPO


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_dhpo_with_token_weight_one_is_ppo_clip(mode):
    batch, logp = random_rollouts(off_policy=0.4)
    leaf = logp.clone().requires_grad_(True)
    loss, _ = run("dhpo", batch, leaf, mixing="constant", token_weight=1.0, eps_token_low=0.2, eps_token_high=0.28)
    ppo_leaf = logp.clone().requires_grad_(True)
    ppo_loss, metrics = run("ppo_clip", batch, ppo_leaf, eps_low=0.2, eps_high=0.28)
    assert float(metrics["clipfrac"]) > 0  # the comparison exercises clipping
    total, ppo_total = aggregate(loss, batch, mode), aggregate(ppo_loss, batch, mode)
    assert torch.allclose(total, ppo_total, atol=1e-6)
    assert torch.allclose(grad_of(total, leaf), grad_of(ppo_total, ppo_leaf), atol=1e-6)


def test_dhpo_with_token_weight_zero_and_seq_mean_is_gspo():
    batch, logp = random_rollouts(off_policy=0.001)
    leaf = logp.clone().requires_grad_(True)
    loss, _ = run("dhpo", batch, leaf, mixing="constant", token_weight=0.0, eps_seq_low=3e-4, eps_seq_high=4e-4)
    gspo_leaf = logp.clone().requires_grad_(True)
    gspo_loss, metrics = run("gspo", batch, gspo_leaf, eps_low=3e-4, eps_high=4e-4)
    assert 0 < float(metrics["clipfrac"]) < 1  # some sequences clipped, some not
    total = aggregate(loss, batch, "seq-mean-token-mean")
    gspo_total = aggregate(gspo_loss, batch, "seq-mean-token-mean")
    assert torch.allclose(total, gspo_total, atol=1e-6)
    assert torch.allclose(grad_of(total, leaf), grad_of(gspo_total, gspo_leaf), atol=1e-6)


def test_dhpo_averaged_arithmetic_numbers():
    batch, leaf = make_batch([[0.0, 0.0]], log_of([[1.5, 0.8]]), [1.0])
    loss, _ = run("dhpo", batch, leaf, mixing="constant", token_weight=0.5, eps_token_low=0.2, eps_token_high=0.2,
                  eps_seq_low=0.05, eps_seq_high=0.05)
    assert torch.allclose(loss, -torch.tensor([[1.125, 0.925]]), atol=1e-6)
    assert float(aggregate(loss, batch).detach()) == pytest.approx(-1.025, abs=1e-6)
    d = torch.log(torch.tensor([[1.5, 0.8]]))
    w = torch.full((1, 2), 0.5)
    r, r_c, _, s = dhpo_mixed_ratios(d, torch.ones(1, 2), w, (0.2, 0.2), (0.05, 0.05))
    assert float(s) == pytest.approx(1.095445, abs=1e-6)
    assert torch.allclose(r, torch.tensor([[1.297723, 0.947723]]), atol=1e-6)
    assert torch.allclose(r_c, torch.tensor([[1.125, 0.925]]), atol=1e-6)
    _, r_c_geo, _, _ = dhpo_mixed_ratios(d, torch.ones(1, 2), w, (0.2, 0.2), (0.05, 0.05), mix="geometric")
    assert torch.allclose(r_c_geo, torch.tensor([[1.122497, 0.916515]]), atol=1e-6)


def test_dhpo_outlier_token_gets_only_the_sequence_branch_gradient():
    # 8 tokens, one with rho = 10; s = 10^(1/8) = 1.3335 lies inside a wide sequence region
    ratios = [[10.0] + [1.0] * 7]
    batch, leaf = make_batch([[0.0] * 8], log_of(ratios), [1.0])
    w = 0.5
    loss, _ = run("dhpo", batch, leaf, mixing="constant", token_weight=w, eps_seq_low=0.5, eps_seq_high=0.5)
    g = grad_of(loss.sum(), leaf)
    s = 10 ** (1 / 8)
    # every token's sequence branch contributes (1-w)*s/L to the outlier; its own token branch is clipped
    assert float(g[0, 0]) == pytest.approx(-(1 - w) * s, rel=1e-5)


def test_dhpo_entropy_mixing_weights_follow_entropy_over_the_batch_max():
    entropy = [[0.5, 2.0, 1.0]]
    batch, leaf = make_batch([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [1.0], entropy=entropy)
    _, metrics = run("dhpo", batch, leaf)
    assert float(metrics["dhpo/token_weight"]) == pytest.approx((0.25 + 1.0 + 0.5) / 3)
    # a batch-wide max from annotate overrides the local one
    prepared = annotated(registry.build("objective", "dhpo"), batch.with_(entropy=torch.tensor([[0.5, 4.0, 1.0]])))
    local = prepared.with_(entropy=torch.tensor(entropy))
    _, metrics = registry.build("objective", "dhpo")(PolicyOutputs(logp=leaf), local)
    assert float(metrics["dhpo/token_weight"]) == pytest.approx((0.125 + 0.5 + 0.25) / 3)


def test_dhpo_onpolicy_gradient_redistributes_credit_within_a_sequence():
    """The documented reason for its skip:T-ONPOL tag: per-token gradient -A*(w_t + mean(1-w)), sum = REINFORCE's."""
    batch, leaf = make_batch([[-1.0, -1.0, -1.0]], None, [2.0], entropy=[[0.5, 2.0, 1.0]])
    loss, _ = run("dhpo", batch, leaf)
    g = grad_of(loss.sum(), leaf)
    w = torch.tensor([0.25, 1.0, 0.5])
    expected = -2.0 * (w + (1 - w).mean())
    assert torch.allclose(g[0], expected, atol=1e-6)
    assert float(g.sum()) == pytest.approx(-2.0 * 3)


def test_dhpo_bad_options_raise():
    with pytest.raises(ValueError, match="mixing"):
        registry.build("objective", "dhpo", {"mixing": "entropyy"})
    with pytest.raises(ValueError, match="mix"):
        registry.build("objective", "dhpo", {"mix": "harmonic"})
    batch, leaf = make_batch([[0.0]], [[0.0]], [1.0])
    with pytest.raises(ValueError, match="entropies"):
        run("dhpo", batch, leaf)


# ---------------------------------------------------------------------------------------------------
# MinPRO


def test_minpro_numbers():
    batch, leaf = make_batch([[0.0, 0.0, 0.0]], log_of([[1.3, 0.5, 1.1]]), [1.0])
    loss, metrics = run("minpro", batch, leaf, eps_low=0.2, eps_high=0.2)
    assert torch.allclose(prefix_min_ratio(torch.tensor([[1.3, 0.5, 1.1]]), torch.ones(1, 3)), torch.tensor([[1.0, 1.3, 0.5]]))
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.65, 0.55]]), atol=1e-6)
    total = aggregate(loss, batch)
    assert float(total.detach()) == pytest.approx(-0.8, abs=1e-6)
    g = grad_of(total, leaf)
    assert torch.allclose(g, torch.tensor([[0.0, -1.3 * 0.5 / 3, -0.5 * 1.1 / 3]]), atol=1e-6)
    assert float(metrics["minpro/weight_min"]) == pytest.approx(0.5)


def test_minpro_weights_carry_no_gradient():
    # token 1 inside the clip range: its gradient is its own term only, not d w_{2,3}/d logp_1
    batch, leaf = make_batch([[0.0, 0.0, 0.0]], log_of([[1.1, 0.5, 1.1]]), [1.0])
    loss, _ = run("minpro", batch, leaf, eps_low=0.2, eps_high=0.2)
    g = grad_of(aggregate(loss, batch), leaf)
    assert float(g[0, 0]) == pytest.approx(-1.1 / 3, abs=1e-6)


def test_minpro_with_all_ratios_one_is_ppo_clip_and_off_policy_differs():
    batch, logp = random_rollouts(off_policy=0.0)
    batch.old_logp = logp.clone()
    leaf, ppo_leaf = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    total = aggregate(run("minpro", batch, leaf)[0], batch)
    ppo_total = aggregate(run("ppo_clip", batch, ppo_leaf, eps_low=0.2, eps_high=0.28)[0], batch)
    assert torch.allclose(grad_of(total, leaf), grad_of(ppo_total, ppo_leaf), atol=1e-7)
    batch, logp = random_rollouts(off_policy=0.4)
    leaf, ppo_leaf = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    total = aggregate(run("minpro", batch, leaf)[0], batch)
    ppo_total = aggregate(run("ppo_clip", batch, ppo_leaf, eps_low=0.2, eps_high=0.28)[0], batch)
    assert not torch.allclose(grad_of(total, leaf), grad_of(ppo_total, ppo_leaf))


def test_minpro_skips_masked_tokens_and_caps_weights():
    ratios = torch.tensor([[1.3, 0.1, 1.1, 0.9]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(prefix_min_ratio(ratios, mask), torch.tensor([[1.0, 1.3, 1.3, 1.1]]))
    batch, leaf = make_batch([[0.0] * 4], log_of(ratios.tolist()), [1.0], mask=mask)
    loss, _ = run("minpro", batch, leaf, eps_low=0.2, eps_high=0.2, w_max=1.0)
    assert float(loss[0, 2].detach()) == pytest.approx(-1.1, abs=1e-6)  # w capped at 1


# ---------------------------------------------------------------------------------------------------
# FiberPO


def test_fiberpo_uniform_drift_censors_the_whole_trajectory():
    batch, leaf = make_batch([[0.5] * 5], [[0.0] * 5], [1.0])
    loss, metrics = run("fiberpo", batch, leaf, delta_base=0.05)
    assert torch.all(grad_of(loss.sum(), leaf) == 0)
    assert float(metrics["fiberpo/base_censored"]) == 1.0
    assert float(metrics["fiberpo/fiber_censored"]) == 0.0  # every residual is 0


def test_fiberpo_single_spike_censors_only_the_spike():
    logp = [[0.0] * 100]
    logp[0][37] = 2.0
    batch, leaf = make_batch(logp, [[0.0] * 100], [1.0])
    loss, metrics = run("fiberpo", batch, leaf, delta_base=0.05, delta_fiber=0.2)
    g = grad_of(loss.sum(), leaf)
    assert float(g[0, 37]) == 0.0
    others = torch.cat([g[0, :37], g[0, 38:]])
    assert torch.allclose(others, torch.full_like(others, -1.0))
    assert float(metrics["fiberpo/base_censored"]) == 0.0


def test_fiberpo_gates_follow_the_advantage_sign():
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    x = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    assert torch.equal(censor_gate(x, adv, 0.05), torch.tensor([[0.0, 1.0, 0.0, 1.0]]))


def test_fiberpo_trajectories_are_block_diagonal():
    batch, logp = random_rollouts(off_policy=0.1)
    leaf = logp.clone().requires_grad_(True)
    g = grad_of(aggregate(run("fiberpo", batch, leaf)[0], batch, "seq-mean-token-sum"), leaf)
    moved = batch.with_(old_logp=batch.old_logp.clone())
    moved.old_logp[1] -= 0.7  # trajectory 1 drifts far away
    leaf2 = logp.clone().requires_grad_(True)
    g2 = grad_of(aggregate(run("fiberpo", moved, leaf2)[0], moved, "seq-mean-token-sum"), leaf2)
    rows = [0, 2, 3, 4, 5]
    assert torch.equal(g[rows], g2[rows])
    assert not torch.equal(g[1], g2[1])


def test_fiberpo_group_level_censors_a_drifting_group():
    # two trajectories of one group, each mean log-ratio 0.03: inside the base budget log(1.05) = 0.0488,
    # outside the group budget log(1.02) = 0.0198
    batch, leaf = make_batch([[0.03, 0.03], [0.03, 0.03]], [[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0], group=[0, 0])
    assert grad_of(run("fiberpo", batch, leaf)[0].sum(), leaf).abs().sum() > 0
    assert torch.all(grad_of(run("fiberpo", batch, leaf, hierarchy="group")[0].sum(), leaf) == 0)
    with pytest.raises(ValueError, match="domain"):
        run("fiberpo", batch, leaf, hierarchy="group+domain")
    domains = batch.with_(rows=[{"domain": "math"}, {"domain": "math"}])
    loss, _ = run("fiberpo", domains, leaf, hierarchy="group+domain", delta_domain=0.5, delta_group=0.5)
    assert grad_of(loss.sum(), leaf).abs().sum() > 0  # the group's residual w.r.t. its domain is 0


def test_fiberpo_bad_options_raise_and_hierarchies_ask_for_whole_groups():
    with pytest.raises(ValueError, match="delta_fiber"):
        registry.build("objective", "fiberpo", {"delta_fiber": 1.5})
    with pytest.raises(ValueError, match="hierarchy"):
        registry.build("objective", "fiberpo", {"hierarchy": "domain"})
    assert not registry.build("objective", "fiberpo").needs_whole_groups
    assert registry.build("objective", "fiberpo", {"hierarchy": "group"}).needs_whole_groups
    batch, leaf = make_batch([[0.0]], [[0.0]], [1.0])
    assert math.isfinite(float(run("fiberpo", batch, leaf)[0].detach().sum()))
