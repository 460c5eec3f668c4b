"""EARL (advantages_rewards.md D1), D³S (D2), VPPO (D3): spec numbers, gradients, edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from policylab.algo.advantages import grpo_advantage
from policylab.algo.objectives import reinforce_loss
from policylab.algo.token_selection import (
    D3SAdvantage,
    VPPOWeights,
    earl_weights,
    high_entropy_mask,
    max_variance_subset,
    perception_kl,
    relaxation,
    token_keep_by_score,
    top_tokens_per_row,
    trajectory_scaling,
)
from policylab.config import Recipe
from policylab.rollouts import PolicyOutputs
from test_advantages_probe_common import make_ctx, make_rollouts, tiny_model

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


# -- D³S -----------------------------------------------------------------------------------------------


def test_d3s_t1_max_variance_subsets():
    a = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    assert sorted(a[max_variance_subset(a, 2)].tolist()) == [-3.0, 2.0]
    assert sorted(a[max_variance_subset(a, 3)].tolist()) == [-3.0, 1.0, 2.0]
    assert float(a[max_variance_subset(a, 3)].var(unbiased=False)) == pytest.approx(4.666667, abs=1e-5)


def test_d3s_subset_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(3, 9, (1,), generator=g))
        k = int(torch.randint(2, n, (1,), generator=g))
        a = torch.randn(n, generator=g)
        best = max(float(a[list(c)].var(unbiased=False)) for c in itertools.combinations(range(n), k))
        assert float(a[max_variance_subset(a, k)].var(unbiased=False)) == pytest.approx(best, abs=1e-6)


def test_d3s_t2_token_scores():
    score = torch.tensor([[0.1, 0.9], [0.6, 0.0]])  # |A|·H for A=1, H=[0.1,0.9] and A=-2, H=[0.3]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert token_keep_by_score(score, mask, 1 / 3).tolist() == [[0, 1], [0, 0]]


def test_d3s_t3_schedule_relaxes_to_full_data():
    assert relaxation(0, 0.5, 10) == 0.5 and relaxation(5, 0.5, 10) == 0.75 and relaxation(12, 0.5, 10) == 1.0
    r = make_rollouts(["p"] * 6, ["ab"] * 6, [0] * 6, rewards=[1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    d3s = D3SAdvantage(relax_steps=1)
    d3s.steps = 1  # past T_w: no down-sampling at all
    ctx = make_ctx(None)
    out = d3s.prepare(r, ctx)
    assert out.batch_size == 6
    torch.testing.assert_close(d3s(out), grpo_advantage(r)[:, None] * r.completion_mask)


def test_d3s_prepare_selects_extremes_keeps_full_group_advantages_and_resumes():
    r = make_rollouts(["p"] * 6, ["ab"] * 5 + ["abc"], [0, 0, 0, 0, 1, 1], rewards=[2.0, 1.0, 0.0, -3.0, 1.0, 0.0])
    r.entropy = torch.tensor([[1.0, 0.1, 0.0]] * 5 + [[0.2, 0.3, 0.9]])
    ctx = make_ctx(None)
    ctx.config = Recipe()
    ctx.config.train.steps = 100
    d3s = D3SAdvantage(sample_fraction=0.5, token_fraction=0.5)
    full = grpo_advantage(r)
    out = d3s.prepare(r, ctx)
    assert out.rewards.tolist() == [2.0, -3.0, 1.0, 0.0]  # k = max(2, ceil(0.5·4)) = 2 extremes; G=2 kept whole
    adv = d3s(out)
    kept_rows = [0, 3, 4, 5]
    for j, i in enumerate(kept_rows):
        nz = adv[j][adv[j] != 0]
        assert torch.allclose(nz, full[i].expand_as(nz))  # never renormalised
    assert adv[out.completion_mask == 0].abs().sum() == 0
    assert 0 < (adv != 0).sum() < out.completion_mask.sum()
    state = d3s.state_dict()
    assert state["steps"] == 1
    other = D3SAdvantage(sample_fraction=0.5, token_fraction=0.5)
    other.load_state_dict(state)
    assert other.fractions(100) == d3s.fractions(100)


def test_d3s_zero_variance_group_and_errors():
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0] * 4)
    ctx = make_ctx(None)
    out = D3SAdvantage(token_fraction=1.0).prepare(r, ctx)
    assert out.batch_size == 2 and D3SAdvantage()(out.with_(extras=dict(out.extras))).abs().sum() == 0
    with pytest.raises(ValueError, match="dropped every group"):
        D3SAdvantage(drop_zero_variance=True, token_fraction=1.0).prepare(r, ctx)
    with pytest.raises(ValueError, match="entropy"):
        D3SAdvantage().prepare(make_rollouts(["p"] * 3, ["a"] * 3, [0] * 3, rewards=[1.0, 0.0, 0.5]), ctx)
    with pytest.raises(ValueError, match="sample_fraction"):
        D3SAdvantage(sample_fraction=0.0)


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
    r = vppo.prepare(r, make_ctx(tiny_model()))
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


def test_vppo_resume_gives_the_same_corrupted_pass():
    r = make_rollouts(["Q: 12 + 30 = ?"] * 2, ["42", "4"], [0, 0], rewards=[1.0, 0.0])
    model, first = tiny_model(), VPPOWeights(seed=4)
    first.prepare(r, make_ctx(model))  # advance the generator once
    state = first.state_dict()
    a = first.prepare(r, make_ctx(model)).extras["vppo_aug_logp"]
    second = VPPOWeights(seed=99)
    second.load_state_dict(state)
    torch.testing.assert_close(second.prepare(r, make_ctx(model)).extras["vppo_aug_logp"], a)
