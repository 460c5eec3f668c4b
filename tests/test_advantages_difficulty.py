"""advantages_rewards.md B4 A-GRAE, B5 DGPO, B7 ADORA, B8 TMN-Reweight (+ data_agents_eval.md A7-A9 rows)."""

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.difficulty import agrae_transform, dgae_advantage, difficulty_weights
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts

ATOL = 1e-4


def make(rewards, group=None, lengths=None, truncated=None, rows=None, components=None):
    return make_rollouts(rewards, group=group, lengths=lengths or [2] * len(rewards), truncated=truncated, prompt_len=2,
                         rows=rows or [], reward_components=components)


# ---------------------------------------------------------------------------------------------- B4 A-GRAE


def test_agrae_t1_t2_batch_accuracy_from_the_batch():
    # groups p = 0.75 and 0.25 -> P = 0.5, as T1 and T2 assume
    adv = registry.build("advantage", "a_grae")(make([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], group=[0] * 4 + [1] * 4))
    assert torch.allclose(adv[:4], torch.tensor([0.538670, 0.538670, 0.538670, -3.232023]), atol=ATOL)
    assert torch.allclose(adv[4:], torch.tensor([0.749997, -0.499998, -0.499998, -0.499998]), atol=ATOL)


def test_agrae_t3_transform_with_explicit_batch_accuracy():
    adv_hat, p = torch.tensor([1.5, -0.5]), torch.tensor([0.25, 0.25])
    assert torch.allclose(agrae_transform(adv_hat, p, 1.0), torch.tensor([1.5, -0.5]), atol=ATOL)
    assert torch.allclose(agrae_transform(adv_hat, p, 0.0), torch.tensor([0.0, -0.5]), atol=ATOL)
    # data_agents_eval.md A8: [1,0,0,0] with batch accuracy 0.4 -> [0.6, -0.5, -0.5, -0.5]
    out = agrae_transform(torch.tensor([1.5, -0.5, -0.5, -0.5]), torch.full((4,), 0.25), 0.4)
    assert torch.allclose(out, torch.tensor([0.6, -0.5, -0.5, -0.5]), atol=1e-3)


def test_agrae_alpha_pos_half_caps_sooner():
    out = agrae_transform(torch.tensor([1.5]), torch.tensor([0.25]), 0.4, alpha_pos=0.5)
    assert out.item() == pytest.approx(1.5 * 0.8, abs=1e-3)  # min(1, 0.4/0.5) = 0.8


def test_agrae_rising_batch_accuracy_shifts_focus_to_hard_groups():
    adv_hat = torch.tensor([-1.0, -1.0])  # negatives: no asymmetry factor, pure difficulty focus
    p = torch.tensor([0.2, 0.8])  # hard, easy
    ratios = [float(agrae_transform(adv_hat, p, acc)[0] / agrae_transform(adv_hat, p, acc)[1]) for acc in (0.1, 0.5, 0.9)]
    assert ratios[0] < ratios[1] < ratios[2]


def test_agrae_edges():
    comp = registry.build("advantage", "a_grae")
    assert torch.equal(comp(make([1.0, 1.0, 0.0, 0.0], group=[0, 0, 1, 1])), torch.zeros(4))  # p in {0,1}
    assert torch.equal(comp(make([1.0, 0.0], group=[0, 1])), torch.zeros(2))  # singletons
    failed = comp(make([1.0, float("nan"), 0.0, 1.0], group=[0, 0, 0, 0]))
    assert torch.isfinite(failed).all() and failed[1] == 0
    plain = registry.build("advantage", "a_grae", {"enable_agrae": False})(make([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(plain, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=ATOL)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        comp(make([2.0, 0.0]))


# ---------------------------------------------------------------------------------------------- B5 DGPO


def test_dgpo_t1_dgae_sums_to_group_size():
    adv = registry.build("advantage", "dgpo")(make([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(adv, torch.tensor([1.999867, -0.666622, -0.666622, -0.666622]), atol=ATOL)
    assert adv.abs().sum().item() == pytest.approx(4.0, abs=1e-3)


def test_dgpo_t2_difficulty_weights():
    weights = difficulty_weights(torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([True, True]), 2.0)
    assert torch.allclose(weights.float(), torch.tensor([1.124353, 0.875647]), atol=ATOL)
    batch = make([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], group=[0] * 4 + [1] * 4)
    adv = registry.build("advantage", "dgpo")(batch)
    dgae = dgae_advantage(batch.rewards, batch.group)
    assert torch.allclose(adv, dgae * torch.tensor([1.124353] * 4 + [0.875647] * 4), atol=ATOL)


def test_dgpo_t3_loss_is_averaged_over_valid_group_tokens():
    # g1 valid (2 x 5 tokens), g2 all correct (2 x 15 tokens)
    batch = make([1.0, 0.0, 1.0, 1.0], group=[0, 0, 1, 1], lengths=[5, 5, 15, 15])
    adv = registry.build("advantage", "dgpo")(batch)
    dgae = dgae_advantage(batch.rewards, batch.group)
    # REINFORCE with logp chosen so that the per-token loss is exactly 1 on g1 under the plain DGAE advantage
    logp = torch.zeros(4, 15)
    logp[:2] = -1 / dgae[:2, None]
    out = PolicyOutputs(logp=logp)
    aggregate = registry.build("aggregate", "token-mean")
    norm = Normaliser.of(batch.completion_mask, max_len=15)
    loss, _ = registry.build("objective", "reinforce")(out, batch.with_(advantages=adv))
    assert aggregate(loss, batch.completion_mask, norm).item() == pytest.approx(1.0, abs=1e-4)
    plain, _ = registry.build("objective", "reinforce")(out, batch.with_(advantages=dgae))
    assert aggregate(plain, batch.completion_mask, norm).item() == pytest.approx(0.25, abs=1e-4)


def test_dgpo_zero_accuracy_counts_as_one_and_edges():
    comp = registry.build("advantage", "dgpo", {"balance_tokens": False})
    # group 0 varies only through another reward term (accuracy 0 everywhere) -> acc := 1
    batch = make([0.5, 0.0, 1.0, 0.0], group=[0, 0, 1, 1],
                 components={"accuracy": torch.tensor([0.0, 0.0, 1.0, 0.0])})
    adv = comp(batch)
    lam = 2 * torch.softmax(torch.tensor([-1.0 / 2, -0.5 / 2]), 0)
    assert torch.allclose(adv, dgae_advantage(batch.rewards, batch.group) * lam.repeat_interleave(2), atol=ATOL)
    assert torch.equal(comp(make([1.0, 1.0, 0.0, 0.0], group=[0, 0, 1, 1])), torch.zeros(4))  # all invalid
    assert torch.equal(registry.build("advantage", "dgpo")(make([1.0])), torch.zeros(1))  # G=1
    failed = registry.build("advantage", "dgpo")(make([1.0, float("nan"), 0.0]))
    assert torch.isfinite(failed).all() and failed[1] == 0
    assert torch.equal(registry.build("advantage", "dgpo")(make([1.0, 0.0], lengths=[0, 0])).isfinite(), torch.ones(2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- B7 ADORA

GRPO4 = torch.tensor([0.866025, 0.866025, -0.866025, -0.866025])


def test_adora_t1_t2():
    t1 = registry.build("advantage", "adora")(make([1.0, 1.0, 0.0, 0.0], lengths=[100, 300, 200, 500]))
    assert torch.allclose(t1, 0.1 * GRPO4, atol=ATOL)
    t2 = registry.build("advantage", "adora")(make([1.0, 1.0, 0.0, 0.0], lengths=[100, 400, 200, 500]))
    assert torch.allclose(t2, GRPO4, atol=ATOL)


def test_adora_t3_truncated_incorrect_and_the_vlm_variant():
    batch = make([1.0, 0.0], lengths=[30, 64], truncated=[False, True])
    grpo = torch.tensor([0.707107, -0.707107])
    assert torch.allclose(registry.build("advantage", "adora")(batch), grpo, atol=ATOL)
    assert torch.allclose(registry.build("advantage", "adora", {"variant": "vlm"})(batch), 0.1 * grpo, atol=ATOL)
    by_length = make([1.0, 0.0], lengths=[30, 60])
    assert torch.allclose(registry.build("advantage", "adora", {"truncation_length": 60})(by_length), grpo, atol=ATOL)
    assert torch.allclose(registry.build("advantage", "adora")(by_length), 0.1 * grpo, atol=ATOL)


def test_adora_data_spec_rows():
    comp = registry.build("advantage", "adora")
    adv = comp(make([1.0, 1.0, 0.0, 0.0], lengths=[300, 500, 400, 450]))  # 500 > 425: advantageous
    assert torch.allclose(adv, GRPO4, atol=ATOL)
    adv = comp(make([1.0, 0.0, 0.0], lengths=[200, 400, 600]))  # 200 < 500: scaled by 0.1
    assert torch.allclose(adv, 0.1 * registry.build("advantage", "grpo")(make([1.0, 0.0, 0.0])), atol=ATOL)
    adv = comp(make([1.0, 0.0, 0.0], lengths=[300, 200, 600], truncated=[False, False, True]))  # 300 > 200
    assert torch.allclose(adv, registry.build("advantage", "grpo")(make([1.0, 0.0, 0.0])), atol=ATOL)


def test_adora_amplify_mode_and_edges():
    adv = registry.build("advantage", "adora", {"lam": 2.0})(make([1.0, 1.0, 0.0, 0.0], lengths=[100, 400, 200, 500]))
    assert torch.allclose(adv, 2.0 * GRPO4, atol=ATOL)
    assert torch.equal(registry.build("advantage", "adora")(make([1.0, 1.0])), torch.zeros(2))
    rloo = registry.build("advantage", "adora", {"base": "rloo"})(make([1.0, 1.0, 0.0, 0.0], lengths=[100, 300, 200, 500]))
    assert torch.allclose(rloo, 0.1 * torch.tensor([2 / 3, 2 / 3, -2 / 3, -2 / 3]), atol=ATOL)
    with pytest.raises(ValueError, match="variant"):
        registry.build("advantage", "adora", {"variant": "vla"})(make([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------- B8 TMN-Reweight


def tmn_batch(rewards_by_prompt, tasks):
    rewards, group, rows = [], [], []
    for g, (rs, task) in enumerate(zip(rewards_by_prompt, tasks)):
        rewards += rs
        group += [g] * len(rs)
        rows += [{"task": task}] * len(rs)
    return make(rewards, group=group, rows=rows)


def test_tmn_t1_task_level_scale():
    batch = tmn_batch([[1.0, 0.0], [1.0, 1.0], [0.2, 0.6]], ["X", "X", "Y"])
    adv = registry.build("advantage", "tmn_reweight")(batch)
    assert torch.allclose(adv, torch.tensor([0.999998, -0.999998, 0.0, 0.0, -0.707104, 0.707104]), atol=ATOL)


def test_tmn_t2_difficulty_reweight():
    batch = tmn_batch([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]], ["X", "X"])
    adv = registry.build("advantage", "tmn_reweight")(batch)
    expected = torch.tensor([1.926034, -0.389400, -0.389400, -0.389400, 0.389400, 0.389400, 0.389400, -1.926034])
    assert torch.allclose(adv, expected, atol=ATOL)


def test_tmn_t3_gamma_zero_is_plain_tmn():
    batch = tmn_batch([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]], ["X", "X"])
    g0 = registry.build("advantage", "tmn_reweight", {"gamma": 0.0})(batch)
    off = registry.build("advantage", "tmn_reweight", {"difficulty_reweight": False})(batch)
    assert torch.equal(g0, off)
    assert torch.allclose(off, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5]), atol=ATOL)


def test_tmn_edges_and_task_ids():
    comp = registry.build("advantage", "tmn_reweight")
    assert torch.equal(comp(tmn_batch([[1.0, 1.0], [0.0, 0.0]], ["X", "X"])), torch.zeros(4))  # s_m = 0
    with pytest.raises(ValueError, match="task"):
        comp(make([1.0, 0.0]))
    single_task = registry.build("advantage", "tmn_reweight", {"default_task": "arith"})(make([1.0, 0.0]))
    assert torch.allclose(single_task, torch.tensor([0.707107, -0.707107]), atol=ATOL)
    singleton = registry.build("advantage", "tmn_reweight", {"default_task": "a"})(make([1.0], group=[0]))
    assert torch.isfinite(singleton).all()
    failed = registry.build("advantage", "tmn_reweight", {"default_task": "a"})(make([1.0, float("nan"), 0.0]))
    assert torch.isfinite(failed).all() and failed[1] == 0


# ---------------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("recipe", ["a_grae", "dgpo", "adora", "tmn_reweight"])
def test_recipes_chain(recipe):
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    build_components(load_recipe(recipe))
