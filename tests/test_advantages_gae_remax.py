"""advantages_rewards.md A6 (GAE + value loss), A7 (ReMax), A9 (HAPO token-level group average)."""

import pytest
import torch

from policylab import registry
from policylab import fields as F
from policylab.algo.advantages.gae import CRITIC_VALUES
from policylab.algo.advantages.group_baselines import remax_advantage
from policylab.algo.advantages.extended_gae import gae
from policylab.algo.objectives.truncated_ppo import clipped_value_loss
from policylab.testing import make_rollouts

ATOL = 1e-4


def make(rewards, group=None, lengths=None, prompts=None, **fields):
    return make_rollouts(rewards, group=group, lengths=lengths or [3] * len(rewards), prompt_len=2,
                         prompts=prompts or [], **fields)


# ---------------------------------------------------------------------------------------------- A6 GAE
# The recursion (policylab.algo.advantages.extended_gae) and the value loss (algo.objectives.truncated_ppo) are shared
# with T-PPO; these are A6's rows.


def generalized_advantages(token_rewards, values, mask, gamma, lam):
    return gae(token_rewards, values, mask, gamma=gamma, lam=lam)


def test_gae_t1_lambda_095():
    adv, ret = generalized_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                                      torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.46575, 0.385, 0.3]]), atol=ATOL)
    assert torch.allclose(ret, torch.tensor([[0.96575, 0.985, 1.0]]), atol=ATOL)


def test_gae_t2_lambda_1_is_monte_carlo():
    adv, _ = generalized_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                                    torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]]), atol=ATOL)


def test_gae_t3_masked_middle_token_is_skipped():
    # M=[1,0,1]: token 0 bootstraps from token 2 (V=0.7, Â=0.3), not from the masked token's value 0.6
    adv, ret = generalized_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                                      torch.tensor([[1.0, 0.0, 1.0]]), gamma=1.0, lam=0.95)
    delta0 = 0.0 + 0.7 - 0.5
    assert adv[0, 0] == pytest.approx(delta0 + 0.95 * 0.3, abs=ATOL)
    assert adv[0, 1] == 0 and ret[0, 1] == 0
    assert adv[0, 2] == pytest.approx(0.3, abs=ATOL)


def test_gae_advantage_is_whitened_gae_of_outcome_rewards():
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.1, 9.0]])
    batch = make([1.0, 0.0], lengths=[3, 2], extras={CRITIC_VALUES: values})
    raw = registry.build("advantage", "gae", {"lam": 0.95, "whiten": False})(batch)
    assert torch.allclose(raw[0], torch.tensor([0.46575, 0.385, 0.3]), atol=ATOL)  # A6 T1 on row 0
    # row 1: R = [0, 0], V = [0.2, 0.1], padding value 9.0 ignored: [0.1 - 0.2 + 0.95 * (0 - 0.1), -0.1, 0]
    assert torch.allclose(raw[1], torch.tensor([-0.195, -0.1, 0.0]), atol=ATOL)
    adv = registry.build("advantage", "gae", {"lam": 0.95})(batch)
    valid = batch.completion_mask > 0
    assert adv[valid].mean().abs() < 1e-5 and adv[valid].std() == pytest.approx(1.0, abs=1e-3)
    assert adv[1, 2] == 0


def test_gae_without_values_names_the_missing_extra():
    with pytest.raises(ValueError, match="critic_values"):
        registry.build("advantage", "gae")(make([1.0]))


def test_gae_declares_the_critic_values_and_the_kl_fields():
    from policylab.interfaces import declared

    assert declared(registry.build("advantage", "gae"), "requires") == ("rewards", CRITIC_VALUES)
    assert set(declared(registry.build("advantage", "gae", {"kl_coef": 0.1}), "requires")) == {
        "rewards", CRITIC_VALUES, "behavior_logp", "ref_logp"}
    assert F.is_declared(CRITIC_VALUES)  # the t_ppo objective's critic declares it


def test_value_loss_takes_the_pessimistic_branch():
    ret = torch.tensor([1.0, 1.0])
    loss, clipped = clipped_value_loss(torch.tensor([2.0, 0.9]), torch.tensor([0.0, 0.8]), ret, clip=0.5)
    # row 0: V_new=2 -> (2-1)^2=1; V_clip=0.5 -> (0.5-1)^2=0.25; max=1 -> 0.5. row 1: (0.1)^2 vs V_clip=0.9 same
    assert torch.allclose(loss, torch.tensor([0.5, 0.005]), atol=1e-6)
    loss2, clipped2 = clipped_value_loss(torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([1.0]), clip=0.5)
    # V_new=-1 -> 4; V_clip=-0.5 -> 2.25; the unclipped (larger) error is kept
    assert loss2.item() == pytest.approx(2.0) and not clipped2.item()
    loss3, clipped3 = clipped_value_loss(torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([0.0]), clip=0.5)
    assert loss3.item() == pytest.approx(4.5) and not clipped3.item()
    loss4, clipped4 = clipped_value_loss(torch.tensor([0.4]), torch.tensor([2.0]), torch.tensor([0.0]), clip=0.5)
    # V_clip = 1.5 -> 2.25 > 0.16: the clipped branch wins
    assert loss4.item() == pytest.approx(1.125) and clipped4.item()


def test_gae_empty_mask_is_zero_not_nan():
    batch = make([1.0, 0.0], lengths=[0, 0], extras={CRITIC_VALUES: torch.zeros(2, 1)})
    adv = registry.build("advantage", "gae")(batch)
    assert torch.equal(adv, torch.zeros(2, 1))


# ---------------------------------------------------------------------------------------------- A7 ReMax


def test_remax_t1_t2():
    assert torch.allclose(remax_advantage(torch.tensor([0.8]), torch.tensor([0.5])), torch.tensor([0.3]))
    batch = make([0.8, 0.5], group=[0, 1], lengths=[3, 3], extras={"remax_baseline": torch.tensor([0.5, 0.5])})
    adv = registry.build("advantage", "remax")(batch)
    assert torch.allclose(adv, torch.tensor([0.3, 0.0]))
    assert torch.allclose(batch.with_(advantages=adv).seq_advantages()[0], torch.tensor([0.3, 0.3, 0.3]))


class FakeContext:
    """Greedy generation (the loop's generate takes task rows) returns a fixed completion per prompt."""

    def __init__(self, greedy_text):
        self.greedy_text, self.calls = greedy_text, []

    def generate(self, rows, **overrides):
        self.calls.append(([r["prompt"] for r in rows], overrides))
        out = make([0.0] * len(rows), group=list(range(len(rows))), prompts=[r["prompt"] for r in rows])
        return out.with_(rewards=None, completions=[self.greedy_text[r["prompt"]] for r in rows])

    def reward(self, prompts, completions, rows):
        return torch.tensor([1.0 if c == r["answer"] else 0.0 for c, r in zip(completions, rows)]), {}


def test_remax_annotate_generates_one_greedy_per_prompt_and_scores_it_with_ctx_reward():
    from policylab.interfaces import declared

    ctx = FakeContext({"p0": "4", "p1": "wrong"})
    p0, p1 = {"prompt": "p0", "answer": "4"}, {"prompt": "p1", "answer": "9"}
    batch = make([1.0, 0.0, 1.0, 1.0], group=[7, 3, 7, 3], prompts=["p0", "p1", "p0", "p1"], rows=[p0, p1, p0, p1])
    comp = registry.build("advantage", "remax")
    values = comp.annotate(batch, ctx)
    assert set(values) == set(declared(comp, "provides")) == {"remax_baseline"} and batch.extras == {}
    prepared = batch.with_(extras=values)
    assert len(ctx.calls) == 1
    prompts, overrides = ctx.calls[0]
    assert sorted(prompts) == ["p0", "p1"] and overrides["temperature"] == 0.0 and overrides["group_size"] == 1
    # prompt p0's greedy answer is right (b=1), p1's is wrong (b=0)
    assert torch.allclose(comp(prepared), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_remax_failed_baseline_gives_zero():
    batch = make([1.0, 0.0], group=[0, 1], extras={"remax_baseline": torch.tensor([float("nan"), 0.0])})
    assert torch.equal(registry.build("advantage", "remax")(batch), torch.tensor([0.0, 0.0]))


def test_remax_without_annotate_says_so():
    with pytest.raises(ValueError, match="annotate"):
        registry.build("advantage", "remax")(make([1.0]))


@pytest.mark.parametrize("recipe", ["remax", "ppo_gae"])
def test_recipes_chain(recipe):
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    parts = build_components(load_recipe(recipe))
    if recipe == "remax":
        assert [(n.where, n.hook) for n in parts.plan.prepare] == [("algorithm.advantage", "annotate")]


# ---------------------------------------------------------------------------------------------- A9 HAPO
# The "hapo" advantage is registered next to the HAPO objective (objectives_ratio.elastic); these are A9's rows.


def hapo_token_group_advantage(rewards, group, lengths):
    batch = make(rewards.tolist(), group=group.tolist(), lengths=[int(x) for x in lengths])
    return registry.build("advantage", "hapo")(batch)


def test_hapo_t1_token_weighted_population_std():
    adv = hapo_token_group_advantage(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([3.0, 1.0]))
    assert torch.allclose(adv, torch.tensor([0.577350, -1.732051]), atol=ATOL)


def test_hapo_objectives_spec_mirror_case():
    adv = hapo_token_group_advantage(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([1.0, 3.0]))
    assert torch.allclose(adv, torch.tensor([1.732051, -0.577350]), atol=ATOL)


def test_hapo_t2_falls_back_to_grpo_per_group():
    batch = make([1.0, 0.0, 1.0, 0.0], group=[0, 0, 1, 1], lengths=[99, 1, 3, 1])
    adv = registry.build("advantage", "hapo")(batch)
    assert torch.allclose(adv[:2], torch.tensor([0.707107, -0.707107]), atol=ATOL)  # raw [0.1005, -9.95] -> GRPO
    assert torch.allclose(adv[2:], torch.tensor([0.577350, -1.732051]), atol=ATOL)  # the other group is not affected


def test_hapo_edges():
    assert torch.equal(hapo_token_group_advantage(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([2.0, 5.0])),
                       torch.zeros(2))
    assert torch.isfinite(hapo_token_group_advantage(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([4.0]))).all()
    empty = hapo_token_group_advantage(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(empty).all()
    failed = hapo_token_group_advantage(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0, 0, 0]), torch.tensor([1.0, 1.0, 1.0]))
    assert failed[1] == 0 and torch.allclose(failed[[0, 2]], torch.tensor([1.0, -1.0]), atol=ATOL)
