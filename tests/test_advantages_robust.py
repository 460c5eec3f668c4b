"""advantages_rewards.md B1 (MC-GRPO), B2 (BNPO), B3 (RiskPO): the spec's numbers, edge cases, resume."""

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.robust import (
    beta_from_moments,
    beta_pdf,
    median_centred_advantages,
    mixed_var_paper_advantages,
)
from policylab.testing import make_rollouts

ATOL = 1e-4


def make(rewards, group=None, lengths=None, components=None):
    b = len(rewards)
    lengths = lengths or [2] * b
    width = max(max(lengths), 1)
    return make_rollouts(rewards, group=group, lengths=lengths, prompt_len=2,
                         completion_ids=torch.arange(b * width).reshape(b, width),
                         old_logp=-torch.arange(b * width, dtype=torch.float32).reshape(b, width),
                         reward_components=components)


# ---------------------------------------------------------------------------------------------- B1 MC-GRPO


def test_mc_grpo_t1_median_mad_and_sign_flip():
    r = torch.tensor([0.0, 0.0, 0.1, 0.2, 1.0])
    adv, pivot = median_centred_advantages(r, torch.zeros(5, dtype=torch.long))
    assert pivot.tolist() == [False, False, True, False, False]
    keep = ~pivot
    assert torch.allclose(adv[keep], torch.tensor([-0.990099, -0.990099, 0.990099, 8.910891]), atol=ATOL)
    assert adv[3] > 0 and (r[3] - r.mean()) < 0  # the mean baseline (0.26) would flip r=0.2 negative


def test_mc_grpo_t2_binary_pivot_is_lowest_index_of_the_median():
    adv, pivot = median_centred_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.long))
    assert pivot.tolist() == [False, True, False]
    assert torch.allclose(adv[~pivot], torch.tensor([1000.0, 0.0]), atol=1e-2)


def test_mc_grpo_t3_transform_drops_one_pivot_per_group_and_keeps_tensors_aligned():
    # two interleaved groups of G+1 = 3 rollouts each
    batch = make([1.0, 0.2, 0.0, 0.9, 0.0, 0.1], group=[4, 9, 4, 9, 4, 9], lengths=[1, 2, 3, 1, 2, 3])
    comp = registry.build("advantage", "mc_grpo")
    kept = comp.transform(batch, ctx=None)
    assert batch.batch_size == 6 and "mc_grpo_advantage" not in batch.extras  # the input batch is not edited
    assert kept.batch_size == 4
    assert torch.bincount(kept.group)[[4, 9]].tolist() == [2, 2]
    # group 4: r=[1,0,0] -> pivot = row 2 (first 0); group 9: r=[0.2,0.9,0.1] -> median 0.2 -> pivot = row 1
    expected_rows = [0, 3, 4, 5]
    assert torch.equal(kept.completion_ids, batch.completion_ids[expected_rows])
    assert torch.equal(kept.old_logp, batch.old_logp[expected_rows])
    assert torch.equal(kept.rewards, batch.rewards[expected_rows])
    adv = comp(kept)
    assert adv.shape == (4,)
    # group 9: m=0.2, MAD = median(|0|,|0.7|,|0.1|) = 0.1 -> A(0.9) = 0.7/0.101, A(0.1) = -0.1/0.101
    assert torch.allclose(adv, torch.tensor([1000.0, 0.7 / 0.101, 0.0, -0.1 / 0.101]), atol=1e-2)


def test_mc_grpo_scale_variants_and_nonzero_rescale():
    r, g = torch.tensor([0.0, 0.0, 0.1, 0.2, 1.0]), torch.zeros(5, dtype=torch.long)
    none, _ = median_centred_advantages(r, g, scale="none")
    assert torch.allclose(none, r - 0.1)
    std, _ = median_centred_advantages(r, g, scale="std")
    assert torch.allclose(std, (r - 0.1) / (r.std() + 1e-3), atol=ATOL)
    resc, _ = median_centred_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.long), nonzero_rescale=True)
    assert resc[0].item() == pytest.approx(1000.0 * 3, rel=1e-3)  # (G+1)/#nonzero = 3/1
    with pytest.raises(ValueError, match="scale"):
        median_centred_advantages(r, g, scale="iqr")


def test_mc_grpo_edges():
    adv, pivot = median_centred_advantages(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3, dtype=torch.long))
    assert torch.equal(adv, torch.zeros(3)) and int(pivot.sum()) == 1
    adv, pivot = median_centred_advantages(torch.tensor([0.7]), torch.zeros(1, dtype=torch.long))  # G = 1
    assert adv.item() == 0 and not pivot.any()
    adv, pivot = median_centred_advantages(torch.tensor([float("nan"), 1.0, 0.0]), torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(adv).all() and adv[0] == 0 and not pivot[0]
    adv, pivot = median_centred_advantages(torch.tensor([float("nan")] * 2), torch.zeros(2, dtype=torch.long))
    assert torch.equal(adv, torch.zeros(2)) and int(pivot.sum()) == 1


def test_mc_grpo_without_transform_is_eval_mode():
    batch = make([1.0, 0.0, 0.0])
    adv = registry.build("advantage", "mc_grpo")(batch)
    assert adv.shape == (3,) and torch.allclose(adv, torch.tensor([1000.0, 0.0, 0.0]), atol=1e-2)


# ---------------------------------------------------------------------------------------------- B2 BNPO


def grouped(p_rewards):
    rewards, group = [], []
    for g, rs in enumerate(p_rewards):
        rewards += rs
        group += [g] * len(rs)
    return rewards, group


def test_bnpo_t1_three_groups():
    rewards, group = grouped([[1, 0, 0, 0], [1, 0], [1, 1]])  # p = 0.25, 0.5, 1.0
    comp = registry.build("advantage", "bnpo")
    adv = comp(make([float(x) for x in rewards], group=group))
    fit = comp.fits["total"]
    assert fit["m"] == pytest.approx(0.583333, abs=ATOL) and fit["v"] == pytest.approx(0.145833, abs=ATOL)
    assert fit["alpha"] == pytest.approx(1.129630, abs=ATOL) and fit["beta"] == pytest.approx(1.092593, abs=ATOL)
    assert torch.allclose(adv[:4], torch.tensor([0.741541, -0.247180, -0.247180, -0.247180]), atol=ATOL)
    assert torch.allclose(adv[4:6], torch.tensor([0.469166, -0.469166]), atol=ATOL)
    assert torch.equal(adv[6:], torch.zeros(2))  # p = 1: pdf 0, weight clamped, times (r - p) = 0 -> 0, not NaN


def test_bnpo_beta_pdf_and_weights():
    alpha, beta = beta_from_moments(0.583333333, 0.145833333)
    w = 1 / beta_pdf(torch.tensor([0.25, 0.5]), alpha, beta)
    assert torch.allclose(w.float(), torch.tensor([0.988721, 0.938331]), atol=ATOL)
    assert beta_pdf(torch.tensor([0.0, 1.0]), 1.0, 1.0).tolist() == [1.0, 1.0]  # 0^0 = 1 at the boundary


def test_bnpo_t2_single_group_is_mean_centred():
    adv = registry.build("advantage", "bnpo")(make([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]), atol=ATOL)


def test_bnpo_t3_decomposition():
    batch = make([2.0, 1.0], components={"acc": torch.tensor([1.0, 0.0]), "fmt": torch.tensor([1.0, 1.0]),
                                         "accuracy": torch.tensor([1.0, 0.0])})
    adv = registry.build("advantage", "bnpo", {"decompose": True})(batch)
    assert torch.allclose(adv, torch.tensor([0.25, -0.25]), atol=ATOL)
    with pytest.raises(ValueError, match="nope"):
        registry.build("advantage", "bnpo", {"decompose": True, "components": ["nope"]})(batch)


def test_bnpo_edges_equal_success_rates_and_range():
    rewards, group = grouped([[1, 0], [0, 1]])  # v = 0 with two groups -> alpha = beta = 1, weight 1
    adv = registry.build("advantage", "bnpo")(make([float(x) for x in rewards], group=group))
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.equal(registry.build("advantage", "bnpo")(make([1.0, 1.0, 1.0])), torch.zeros(3))
    # G=1: p_g := 0 (B2 step 2) and one group -> alpha = beta = 1, so A = r - 0
    assert torch.equal(registry.build("advantage", "bnpo")(make([1.0])), torch.ones(1))
    with pytest.raises(ValueError, match="outside"):
        registry.build("advantage", "bnpo")(make([2.0, 0.0]))


def test_bnpo_resume_gives_the_same_advantages():
    batches = [make([float(x) for x in grouped(p)[0]], group=grouped(p)[1])
               for p in ([[1, 0, 0, 0], [1, 1, 0, 0]], [[1, 1, 1, 0], [0, 0, 0, 1], [1, 0]], [[1, 0], [1, 1, 1, 0]])]
    straight = registry.build("advantage", "bnpo", {"momentum": 0.5})
    outs = [straight(b) for b in batches]
    first = registry.build("advantage", "bnpo", {"momentum": 0.5})
    first(batches[0]), first(batches[1])
    resumed = registry.build("advantage", "bnpo", {"momentum": 0.5})
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed(batches[2]), outs[2])
    fresh = registry.build("advantage", "bnpo", {"momentum": 0.5})
    assert not torch.allclose(fresh(batches[2]), outs[2])  # the state matters, so the resume test can fail


# ---------------------------------------------------------------------------------------------- B3 RiskPO


def test_riskpo_t1_paper_level_parts():
    s = torch.tensor([1.0, 0.0, 2.0])  # a = quantile 0.2 = 0.4, b = quantile 0.9 = 1.8
    rvar = mixed_var_paper_advantages(s, 0.2, 0.9, 0.0, normalise_by_std=False)
    assert torch.allclose(rvar, torch.tensor([-1.142856, -1.999997, 0.0]), atol=ATOL)
    mixed = mixed_var_paper_advantages(s, 0.2, 0.9, 1.5)
    assert torch.allclose(mixed, torch.tensor([-0.457142, -1.999991, 0.0]), atol=ATOL)
    # CVaR part alone: (w A^C + A^R)/(w+1) * (w+1) - A^R = w A^C
    raw = mixed_var_paper_advantages(s, 0.2, 0.9, 1.5, normalise_by_std=False) * 2.5 - rvar
    assert torch.allclose(raw / 1.5, torch.tensor([0.0, -1.99999, 0.0]), atol=ATOL)


def riskpo_t1_batch():
    # questions A (group 0): [1,0,1], B (group 1): [0,0,1], interleaved; one bundle of two questions
    return make([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], group=[0, 1, 0, 1, 0, 1])


def test_riskpo_t1_std_credit():
    adv = registry.build("advantage", "riskpo", {"bundle_size": 2})(riskpo_t1_batch())
    # rows: A0 B0 A1 B1 A2 B2; paper k = {A_k, B_k}
    expected = torch.tensor([-0.791791, -0.791791, -3.464080, -3.464080, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=ATOL)


def test_riskpo_other_credit_modes():
    paper = torch.tensor([-0.457142, -0.457142, -1.999991, -1.999991, 0.0, 0.0])
    uniform = registry.build("advantage", "riskpo", {"bundle_size": 2, "credit": "uniform"})(riskpo_t1_batch())
    assert torch.allclose(uniform, paper, atol=ATOL)
    score = registry.build("advantage", "riskpo", {"bundle_size": 2, "credit": "score"})(riskpo_t1_batch())
    assert torch.allclose(score, paper * torch.tensor([0.5, 1.5, 1.5, 1.5, 0.5, 0.5]), atol=ATOL)
    sum_mean = registry.build("advantage", "riskpo", {"bundle_size": 2, "credit": "sum-mean"})(riskpo_t1_batch())
    # paper 0: centred [1/3, -1/3] sums to 0 -> A/Q; paper 1: [-2/3, -1/3] / -1 -> shares [2/3, 1/3]
    expected = torch.tensor([-0.457142 / 2, -0.457142 / 2, -1.999991 * 2 / 3, -1.999991 / 3, 0.0, 0.0])
    assert torch.allclose(sum_mean, expected, atol=ATOL)
    with pytest.raises(ValueError, match="credit"):
        registry.build("advantage", "riskpo", {"credit": "median"})


@pytest.mark.parametrize("credit", ["std", "uniform", "score"])
def test_riskpo_t2_never_positive(credit):
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        rewards = (torch.rand(40, generator=gen) > 0.5).float().tolist()
        group = [i // 4 for i in range(40)]
        adv = registry.build("advantage", "riskpo", {"bundle_size": 3, "credit": credit})(make(rewards, group=group))
        assert (adv <= 1e-7).all() and torch.isfinite(adv).all()


def test_riskpo_t3_equal_bundle_and_edges():
    assert torch.equal(registry.build("advantage", "riskpo", {"bundle_size": 2})(make([1.0] * 6, group=[0, 1] * 3)), torch.zeros(6))
    single = registry.build("advantage", "riskpo")(make([1.0], group=[0]))  # one paper: a = b = S_0
    assert torch.equal(single, torch.zeros(1))
    # unequal groups: question 1 has 1 rollout, so the bundle has one paper and question 0's extra rows get 0
    uneven = registry.build("advantage", "riskpo", {"bundle_size": 2})(make([1.0, 0.0, 1.0, 0.0], group=[0, 0, 0, 1]))
    assert torch.equal(uneven, torch.zeros(4))
    failed = registry.build("advantage", "riskpo", {"bundle_size": 2})(make([1.0, float("nan"), 0.0, 0.0, 1.0, 1.0], group=[0, 1] * 3))
    assert torch.isfinite(failed).all() and failed[1] == 0


def test_riskpo_bundles_are_separate():
    # two bundles of one question each (bundle_size 1): per-question RiskPO, each on its own scores
    both = registry.build("advantage", "riskpo", {"bundle_size": 1, "credit": "uniform"})(
        make([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0], group=[0, 0, 0, 0, 1, 1, 1, 1]))
    alone = registry.build("advantage", "riskpo", {"bundle_size": 1, "credit": "uniform"})(make([1.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(both[:4], alone) and (both[:4] != 0).any()


def test_riskpo_tracked_quantiles_resume():
    gen = torch.Generator().manual_seed(0)
    batches = [make((torch.rand(24, generator=gen) > 0.4).float().tolist(), group=[i // 3 for i in range(24)]) for _ in range(4)]
    params = {"bundle_size": 2, "quantile_mode": "tracked", "lr_q": 0.3}
    straight = registry.build("advantage", "riskpo", params)
    outs = [straight(b) for b in batches]
    first = registry.build("advantage", "riskpo", params)
    for b in batches[:3]:
        first(b)
    resumed = registry.build("advantage", "riskpo", params)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed(batches[3]), outs[3])
    empirical = registry.build("advantage", "riskpo", {"bundle_size": 2})(batches[3])
    assert not torch.allclose(empirical, outs[3])  # tracked quantiles really reach the advantage
    with pytest.raises(ValueError, match="grid"):
        registry.build("advantage", "riskpo", {"quantile_mode": "tracked", "quantile_low": 0.22})


# ---------------------------------------------------------------------------------------------- declarations


def test_mc_grpo_is_a_batch_transform_that_sets_its_declared_field():
    from policylab.interfaces import declared

    comp = registry.build("advantage", "mc_grpo")
    assert declared(comp, "provides") == ("mc_grpo_advantage",) and declared(comp, "requires") == ("rewards",)
    kept = comp.transform(make([1.0, 0.0, 0.0]))
    assert set(kept.extras) == {"mc_grpo_advantage"}
    kept.validate("mc_grpo")


@pytest.mark.parametrize("recipe", ["mc_grpo", "bnpo", "riskpo"])
def test_recipes_chain(recipe):
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    parts = build_components(load_recipe(recipe))
    hooks = [n.hook for n in parts.plan.prepare if n.where == "algorithm.advantage"]
    assert hooks == (["transform"] if recipe == "mc_grpo" else [])
