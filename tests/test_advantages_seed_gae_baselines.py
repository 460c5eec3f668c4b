"""advantages_rewards.md A6 (GAE + value loss), A7 (ReMax), A9 (HAPO token-level group average)."""

import pytest
import torch

from policylab import registry
from policylab.algo.advantages_seed.baselines import remax_advantage
from policylab.algo.advantages_seed.gae import explained_variance
from policylab.algo.value import clipped_value_loss, gae
from policylab.rollouts import Rollouts

ATOL = 1e-4


def make(rewards, group=None, lengths=None, prompts=None, **extra):
    b = len(rewards)
    lengths = lengths or [3] * b
    width = max(max(lengths), 1)
    mask = torch.zeros(b, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Rollouts(prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2),
                    completion_ids=torch.ones(b, width, dtype=torch.long), completion_mask=mask,
                    group=torch.tensor(group or [0] * b), truncated=torch.zeros(b, dtype=torch.bool),
                    rewards=torch.tensor(rewards, dtype=torch.float32), prompts=prompts or [], **extra)


# ---------------------------------------------------------------------------------------------- A6 GAE
# The recursion and the value loss are the shared functions of policylab.algo.value; these are A6's rows.


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
    batch = make([1.0, 0.0], lengths=[3, 2], extras={"value/values": values})
    raw = registry.build("advantage", "gae", {"lam": 0.95, "whiten": False})(batch)
    assert torch.allclose(raw[0], torch.tensor([0.46575, 0.385, 0.3]), atol=ATOL)  # A6 T1 on row 0
    # row 1: R = [0, 0], V = [0.2, 0.1], padding value 9.0 ignored: [0.1 - 0.2 + 0.95 * (0 - 0.1), -0.1, 0]
    assert torch.allclose(raw[1], torch.tensor([-0.195, -0.1, 0.0]), atol=ATOL)
    adv = registry.build("advantage", "gae", {"lam": 0.95})(batch)
    valid = batch.completion_mask > 0
    assert adv[valid].mean().abs() < 1e-5 and adv[valid].std() == pytest.approx(1.0, abs=1e-3)
    assert adv[1, 2] == 0


def test_gae_without_values_names_the_missing_extra():
    with pytest.raises(ValueError, match="values"):
        registry.build("advantage", "gae")(make([1.0]))
    with_values = make([1.0], extras={"values": torch.zeros(1, 3)})
    assert registry.build("advantage", "gae", {"values_key": "values"})(with_values).shape == (1, 3)


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


def test_explained_variance():
    mask = torch.ones(1, 4)
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, mask).item() == pytest.approx(0.0)
    assert explained_variance(ret, torch.ones_like(ret), mask).item() == 0.0  # no variance in returns: 0, not NaN


def test_gae_empty_mask_is_zero_not_nan():
    batch = make([1.0, 0.0], lengths=[0, 0], extras={"value/values": torch.zeros(2, 1)})
    adv = registry.build("advantage", "gae")(batch)
    assert torch.equal(adv, torch.zeros(2, 1))


# ---------------------------------------------------------------------------------------------- A7 ReMax


def test_remax_t1_t2():
    assert torch.allclose(remax_advantage(torch.tensor([0.8]), torch.tensor([0.5])), torch.tensor([0.3]))
    batch = make([0.8, 0.5], group=[0, 1], lengths=[3, 3], extras={"remax/baseline": torch.tensor([0.5, 0.5])})
    adv = registry.build("advantage", "remax")(batch)
    assert torch.allclose(adv, torch.tensor([0.3, 0.0]))
    assert torch.allclose(batch.with_(advantages=adv).seq_advantages()[0], torch.tensor([0.3, 0.3, 0.3]))


class FakeContext:
    """Greedy generation (the loop's generate takes task rows) returns a fixed completion per prompt."""

    def __init__(self, greedy_text):
        self.greedy_text, self.calls, self.extras = greedy_text, [], {}

    def generate(self, rows, **overrides):
        self.calls.append(([r["prompt"] for r in rows], overrides))
        out = make([0.0] * len(rows), group=list(range(len(rows))), prompts=[r["prompt"] for r in rows])
        return out.with_(rewards=None, completions=[self.greedy_text[r["prompt"]] for r in rows])

    def reward(self, prompts, completions, rows):
        return torch.tensor([1.0 if c == r["answer"] else 0.0 for c, r in zip(completions, rows)]), {}


def test_remax_prepare_generates_one_greedy_per_prompt_and_scores_it():
    ctx = FakeContext({"p0": "4", "p1": "wrong"})
    p0, p1 = {"prompt": "p0", "answer": "4"}, {"prompt": "p1", "answer": "9"}
    batch = make([1.0, 0.0, 1.0, 1.0], group=[7, 3, 7, 3], prompts=["p0", "p1", "p0", "p1"], rows=[p0, p1, p0, p1])
    comp = registry.build("advantage", "remax")
    prepared = comp.prepare(batch, ctx)
    assert len(ctx.calls) == 1
    prompts, overrides = ctx.calls[0]
    assert sorted(prompts) == ["p0", "p1"] and overrides["temperature"] == 0.0 and overrides["group_size"] == 1
    # prompt p0's greedy answer is right (b=1), p1's is wrong (b=0)
    assert torch.allclose(comp(prepared), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_remax_failed_baseline_gives_zero():
    batch = make([1.0, 0.0], group=[0, 1], extras={"remax/baseline": torch.tensor([float("nan"), 0.0])})
    assert torch.equal(registry.build("advantage", "remax")(batch), torch.tensor([0.0, 0.0]))


def test_remax_without_prepare_says_so():
    with pytest.raises(ValueError, match="prepare"):
        registry.build("advantage", "remax")(make([1.0]))


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
