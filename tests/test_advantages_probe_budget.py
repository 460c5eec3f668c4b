"""BRPO budgeted advantages (arXiv:2505.13438)."""

from __future__ import annotations

import pytest
import torch

from policylab.algo.advantages.budget import brpo_summary_advantages, brpo_think_advantages, budget_weights
from policylab.annotate.summaries import BRPOAdvantage
from policylab.config import load_recipe
from policylab.rewards.combine import RewardCombiner
from policylab.testing import make_context
from policylab.train.components import build_components
from test_advantages_probe_common import CharTokenizer, make_ctx, make_rollouts, tiny_model


def test_brpo_t1_thinking_advantages():
    out = brpo_think_advantages(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), budget_weights(2))
    torch.testing.assert_close(out, torch.tensor([[-0.25, 0.25], [0.25, 0.0]], dtype=torch.float64))


def test_brpo_t2_single_budget_is_mean_centred():
    r = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]])
    out = brpo_think_advantages(r, budget_weights(1))
    torch.testing.assert_close(out.float(), r - r.mean())


def test_brpo_t3_summary_advantages():
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0]])[..., None]  # [G,S,A=1]
    out = brpo_summary_advantages(r)[..., 0]
    assert out[:, 0].tolist() == [-0.5, 0.5] and out[:, 1].tolist() == [0.0, 0.0]
    many = brpo_summary_advantages(torch.tensor([[[1.0, 0.0, 0.5]]]))  # A > 1: mean over the trace's own summaries
    assert many[0, 0].tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_brpo_variants_and_single_trace():
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    p = budget_weights(2)
    v1 = brpo_think_advantages(r, p, variant="v1only")
    assert v1[1, 1] == pytest.approx(0.5 - 0.5)  # V1_{1,1} = r_{1,0}·p_1 = 0.5
    assert torch.equal(brpo_think_advantages(r, p, variant="none"), torch.flip(torch.cumsum(torch.flip(r.double() * p, [1]), 1), [1]))
    single = brpo_think_advantages(torch.tensor([[1.0, 0.0]]), p)  # G=1: V2 = 0
    assert single[0, 0] == pytest.approx(0.5)
    assert budget_weights(3, "linear").tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    for bad in (dict(variant="grpo"), dict(budget_prior="base"), dict(summary_max_tokens=0)):
        with pytest.raises(ValueError):
            BRPOAdvantage(**bad)


class FixedRewards:
    """Stands in for the recipe's rewards: returns the next values in order, with an accuracy component."""

    def __init__(self, values):
        self.values = values

    def __call__(self, prompts, completions, rows):
        total = torch.tensor(self.values[: len(completions)], dtype=torch.float32)
        return total, {"numeric_answer": total, "accuracy": (total > 0.5).float()}


def test_brpo_transform_maps_segments_and_appends_summaries():
    r = make_rollouts(["Q: 1+1?"] * 2, ["abcd", "efgh"], [0, 0], rewards=[1.0, 1.0], rows=[{"answer": "2"}] * 2)
    r.behavior_logp = torch.full((2, 4), -1.0)
    r.reward_components = {"numeric_answer": r.rewards.clone(), "accuracy": r.rewards.clone()}
    brpo = BRPOAdvantage(num_budgets=2, max_budget=4, summary_max_tokens=3)
    ctx = make_ctx(tiny_model(), reward=FixedRewards([0.0, 1.0, 1.0, 1.0]))  # (trace, budget): r = [[0,1],[1,1]]
    out = brpo.transform(r, ctx)
    out.validate("brpo")
    assert out.batch_size == 2 + 4
    assert out.extras["brpo_is_summary"].tolist() == [False, False, True, True, True, True]
    adv = brpo(out)
    torch.testing.assert_close(adv[0], torch.tensor([-0.25, -0.25, 0.25, 0.25]))
    torch.testing.assert_close(adv[1], torch.tensor([0.25, 0.25, 0.0, 0.0]))
    summary_adv = [float(adv[2 + j][out.completion_mask[2 + j] > 0][0]) for j in range(4)]
    assert summary_adv == pytest.approx([-0.5, 0.0, 0.5, 0.0])  # rows ordered (trace, budget)
    assert len(set(out.group[2:].tolist()) & set(out.group[:2].tolist())) == 0
    assert out.behavior_logp is not None and out.behavior_logp.shape == out.completion_mask.shape
    assert not torch.isnan(adv).any()


def test_brpo_end_to_end_with_recipe_rewards_and_resume():
    recipe = load_recipe("brpo")
    ctx = make_context(tiny_model(), CharTokenizer(), reward=RewardCombiner(recipe.rewards))
    r = make_rollouts(["Q: 1+1?"] * 2, ["1+1=2", "3"], [0, 0], rewards=[1.0, 0.0], rows=[{"answer": "2"}] * 2)
    r.extras["max_new_tokens"] = 5
    first = BRPOAdvantage(num_budgets=2, summary_max_tokens=2, train_summaries=False, seed=3)
    state = first.state_dict()
    a = first.transform(r, ctx)
    second = BRPOAdvantage(num_budgets=2, summary_max_tokens=2, train_summaries=False)
    second.load_state_dict(state)
    b = second.transform(r, ctx)
    assert a.batch_size == 2 and torch.equal(first(a), second(b))
    assert set(first.metrics) == {"brpo/acc_budget_0", "brpo/acc_budget_1"}
    with pytest.raises(ValueError, match="transform"):
        BRPOAdvantage()(r)


def test_brpo_declarations_and_recipe_chain():
    brpo = BRPOAdvantage()
    assert {"brpo_adv", "max_new_tokens"} <= set(brpo.requires)  # __call__ reads brpo_adv; the budget split reads max_new_tokens
    parts = build_components(load_recipe("brpo"))
    assert [(n.hook, n.provides) for n in parts.plan.prepare if n.where == "algorithm.advantage"] == \
        [("transform", BRPOAdvantage.provides)]
