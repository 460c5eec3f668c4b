"""EARL (advantages_rewards.md D1) and VPPO (D3) token weights: spec numbers, gradients, edge cases,
declarations (policylab.algo.token_weights; VPPO's corrupted-prompt pass in policylab.annotate.perception)."""

from __future__ import annotations

import pytest
import torch

from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.objectives.policy_gradient import reinforce_loss
from policylab.algo.token_weights.earl import earl_weights, high_entropy_mask
from policylab.algo.token_weights.vppo import perception_kl, top_tokens_per_row, trajectory_scaling
from policylab.annotate.perception import VPPOWeights
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import PolicyOutputs
from policylab.train.components import build_components
from test_advantages_probe_common import annotated, make_ctx, make_rollouts, tiny_model

# -- EARL ----------------------------------------------------------------------------------------------


def test_earl_t1_threshold():
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    keep, theta = high_entropy_mask(h, torch.ones(1, 5), 0.2)
    assert float(theta) == pytest.approx(0.42) and keep.tolist() == [[0, 0, 0, 0, 1]]


def test_earl_t2_full_fraction_keeps_all_and_ties_kept():
    h = torch.tensor([[0.3, 0.1, 0.2]])
    assert high_entropy_mask(h, torch.ones(1, 3), 1.0)[0].tolist() == [[1, 1, 1]]
    tied = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    assert high_entropy_mask(tied, torch.ones(1, 4), 0.25)[0].tolist() == [[1, 1, 1, 0]]


def test_earl_t3_unkept_tokens_get_zero_gradient_and_padding_ignored():
    r = make_rollouts(["p"] * 2, ["abcd", "ab"], [0, 0], rewards=[1.0, 0.0])
    r.advantages = grpo_advantage(r)
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    entropy = torch.tensor([[0.1, 2.0, 0.3, 0.2], [0.4, 9.0, 0.0, 0.0]])
    entropy[1, 2:] = 50.0  # padding entropies must not count
    out = PolicyOutputs(logp=logp, entropy=entropy)
    w, metrics = earl_weights(out, r, top_fraction=0.34)
    assert w[1, 2:].sum() == 0 and w.sum() == 2  # 6 valid tokens, the 2 largest (2.0, 9.0) kept
    loss, _ = reinforce_loss(out, r)
    (loss * w * r.completion_mask).sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    assert float(metrics["earl/kept_frac"]) == pytest.approx(2 / 6)


def test_earl_empty_mask_no_nan():
    r = make_rollouts(["p"], [""], [0], rewards=[1.0])
    w, metrics = earl_weights(PolicyOutputs(logp=torch.zeros(1, 1), entropy=torch.ones(1, 1)), r)
    assert w.sum() == 0 and all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    with pytest.raises(ValueError, match="top_fraction"):
        high_entropy_mask(torch.ones(1, 1), torch.ones(1, 1), 0.0)


def test_earl_recipe_chains():
    parts = build_components(load_recipe("earl"))
    assert parts.plan.prepare == [] or all(not n.where.startswith("algorithm.token_weights") for n in parts.plan.prepare)


# -- VPPO ----------------------------------------------------------------------------------------------


def test_vppo_t1_token_mask():
    kappa = torch.tensor([[0.1, 0.5, 0.0, 0.3]])
    assert top_tokens_per_row(kappa, torch.ones(1, 4), 0.4).tolist() == [[0, 1, 0, 1]]


def test_vppo_t2_trajectory_scaling():
    kappa = torch.tensor([[0.1], [0.3], [0.5]])
    f = trajectory_scaling(kappa, torch.ones(3, 1), 0.9)
    assert f.tolist() == pytest.approx([0.9, 1.0, 1.1], abs=1e-6) and float(f.mean()) == pytest.approx(1.0)
    assert trajectory_scaling(torch.ones(2, 1), torch.ones(2, 1)).tolist() == [1.0, 1.0]  # no spread


def test_vppo_t3_perception_kl():
    assert float(perception_kl(torch.tensor(-1.0), torch.tensor(-2.0))) == pytest.approx(0.367879, abs=1e-6)
    assert float(perception_kl(torch.tensor(-1.0), torch.tensor(-1.0))) == 0.0


def test_vppo_end_to_end_weights():
    r = make_rollouts(["Q: 12 + 30 = ?"] * 2, ["42", "4"], [0, 0], rewards=[1.0, 0.0])
    vppo = VPPOWeights(top_fraction=0.5)
    assert declared(vppo, "provides") == ("vppo_aug_logp",)
    r = annotated(vppo, r, make_ctx(tiny_model()))
    assert r.extras["vppo_aug_logp"].shape == (2, 2)
    out = PolicyOutputs(logp=torch.full((2, 2), -1.0))
    w, metrics = vppo(out, r)
    assert w[1, 1] == 0  # padding
    assert (w[0] > 0).sum() == 1 and (w[1] > 0).sum() == 1
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    empty = make_rollouts(["p"], [""], [0], rewards=[1.0])
    empty.extras["vppo_aug_logp"] = torch.zeros(1, 1)
    w, _ = vppo(PolicyOutputs(logp=torch.zeros(1, 1)), empty)
    assert w.sum() == 0
    with pytest.raises(ValueError, match="annotate"):
        vppo(out, make_rollouts(["p"], ["a"], [0], rewards=[1.0]))


def test_vppo_resume_gives_the_same_corrupted_pass():
    r = make_rollouts(["Q: 12 + 30 = ?"] * 2, ["42", "4"], [0, 0], rewards=[1.0, 0.0])
    model, first = tiny_model(), VPPOWeights(seed=4)
    first.annotate(r, make_ctx(model))  # advance the generator once
    state = first.state_dict()
    a = first.annotate(r, make_ctx(model))["vppo_aug_logp"]
    second = VPPOWeights(seed=99)
    second.load_state_dict(state)
    torch.testing.assert_close(second.annotate(r, make_ctx(model))["vppo_aug_logp"], a)


def test_vppo_recipe_chains():
    parts = build_components(load_recipe("vppo"))
    assert parts.plan.provided["vppo_aug_logp"].startswith("algorithm.token_weights.0")
