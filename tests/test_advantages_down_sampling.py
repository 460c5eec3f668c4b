"""D³S (advantages_rewards.md D2): max-variance rollout subsets, |A|·H token selection, the relaxing
schedule, and its batch transform (policylab.algo.advantages.down_sampling)."""

from __future__ import annotations

import itertools

import pytest
import torch

from policylab.algo.advantages.down_sampling import D3SAdvantage, max_variance_subset, relaxation, token_keep_by_score
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.train.components import build_components
from test_advantages_probe_common import make_ctx, make_rollouts


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
    out = d3s.transform(r, make_ctx(None))
    assert out.batch_size == 6
    torch.testing.assert_close(d3s(out), grpo_advantage(r)[:, None] * r.completion_mask)


def test_d3s_transform_selects_extremes_keeps_full_group_advantages_and_resumes():
    r = make_rollouts(["p"] * 6, ["ab"] * 5 + ["abc"], [0, 0, 0, 0, 1, 1], rewards=[2.0, 1.0, 0.0, -3.0, 1.0, 0.0])
    r.entropy = torch.tensor([[1.0, 0.1, 0.0]] * 5 + [[0.2, 0.3, 0.9]])
    d3s = D3SAdvantage(sample_fraction=0.5, token_fraction=0.5, total_steps=100)
    assert set(declared(d3s, "requires")) == {"rewards", "entropy", "d3s_advantage"}
    assert declared(d3s, "provides") == ("d3s_advantage",)
    full = grpo_advantage(r)
    out = d3s.transform(r, make_ctx(None))
    out.validate("d3s")
    assert out.rewards.tolist() == [2.0, -3.0, 1.0, 0.0]  # k = max(2, ceil(0.5·4)) = 2 extremes; G=2 kept whole
    adv = d3s(out)
    kept_rows = [0, 3, 4, 5]
    for j, i in enumerate(kept_rows):
        nz = adv[j][adv[j] != 0]
        assert torch.allclose(nz, full[i].expand_as(nz))  # never renormalised
    assert adv[out.completion_mask == 0].abs().sum() == 0
    assert 0 < (adv != 0).sum() < out.completion_mask.sum()
    assert d3s.last_metrics["d3s/kept_samples"] == pytest.approx(4 / 6)
    state = d3s.state_dict()
    assert state["steps"] == 1
    other = D3SAdvantage(sample_fraction=0.5, token_fraction=0.5, total_steps=100)
    other.load_state_dict(state)
    assert other.fractions() == d3s.fractions()


def test_d3s_zero_variance_group_and_errors():
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0] * 4)
    out = D3SAdvantage(token_fraction=1.0, relax_steps=10).transform(r)
    assert out.batch_size == 2 and D3SAdvantage(relax_steps=10)(out).abs().sum() == 0
    assert "entropy" not in declared(D3SAdvantage(token_fraction=1.0, relax_steps=10), "requires")
    with pytest.raises(ValueError, match="dropped every group"):
        D3SAdvantage(drop_zero_variance=True, token_fraction=1.0, relax_steps=10).transform(r)
    with pytest.raises(ValueError, match="entropy"):
        D3SAdvantage(relax_steps=10).transform(make_rollouts(["p"] * 3, ["a"] * 3, [0] * 3, rewards=[1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="sample_fraction"):
        D3SAdvantage(sample_fraction=0.0, relax_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        D3SAdvantage().transform(r)  # no ctx: no run length to relax over
    with pytest.raises(ValueError, match="transform"):
        D3SAdvantage(relax_steps=10)(r)


def test_d3s_recipe_chains_entropy_before_the_transform():
    parts = build_components(load_recipe("d3s"))
    order = [(n.where, n.hook) for n in parts.plan.prepare]
    assert order[-1] == ("algorithm.advantage", "transform")
    assert "policy_entropy" in parts.plan.provided["entropy"]
