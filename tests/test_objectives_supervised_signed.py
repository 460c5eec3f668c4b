"""PSR / NSR / W-REINFORCE advantages (§3.4) and the ReasonMaxxer advantage (§4.3):
policylab.algo.advantages.signed_subsets."""

from __future__ import annotations

import pytest
import torch

from policylab import registry
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts


def make_batch(rewards, lengths=None, group=None):
    return make_rollouts(rewards, group=group, lengths=lengths or [2] * len(rewards), prompt_len=2)


def reinforce_grad(batch, logp):
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "reinforce")(PolicyOutputs(leaf), batch)
    m = batch.completion_mask
    registry.build("aggregate", "token-mean")(loss * m, m, Normaliser.of(m, 8)).backward()
    return leaf.grad


def test_w_reinforce_lambda_one_is_reinforce_with_plus_minus_one_rewards():
    batch = make_batch([1.0, 0.0, 1.0, float("nan")])
    adv = registry.build("advantage", "w_reinforce", {"positive_weight": 1.0})(batch)
    assert adv.tolist() == [1.0, -1.0, 1.0, 0.0]
    assert registry.build("advantage", "w_reinforce")(batch).tolist() == pytest.approx([0.1, -1.0, 0.1, 0.0])


def test_w_reinforce_lambda_zero_equals_nsr_up_to_the_normaliser():
    batch = make_batch([1.0, 0.0, 1.0, 0.0], lengths=[2, 3, 1, 2])
    logp = torch.log(torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1)
    full = batch.with_(advantages=registry.build("advantage", "w_reinforce", {"positive_weight": 0.0})(batch))
    g_full = reinforce_grad(full, logp)
    nsr = registry.build("advantage", "nsr")
    sub = nsr.transform(batch)
    assert sub.rewards.tolist() == [0.0, 0.0]  # only incorrect samples remain
    sub = sub.with_(advantages=nsr(sub))
    g_sub = reinforce_grad(sub, logp[[1, 3]])
    n_full, n_sub = batch.completion_mask.sum(), sub.completion_mask.sum()
    assert torch.allclose(g_full[[1, 3]] * n_full / n_sub, g_sub, atol=1e-7)
    assert torch.all(g_full[[0, 2]] == 0)


def test_psr_batch_contains_no_incorrect_sample_and_an_empty_subset_masks_everything():
    psr = registry.build("advantage", "psr")
    batch = make_batch([1.0, 0.0, float("nan"), 1.0], group=[0, 0, 1, 1])
    kept = psr.transform(batch)
    assert kept.rewards.tolist() == [1.0, 1.0] and psr(kept).tolist() == [1.0, 1.0]
    wrong = make_batch([0.0, 0.0])
    none_correct = psr.transform(wrong)
    assert none_correct.batch_size == 2 and none_correct.completion_mask.sum() == 0
    assert wrong.completion_mask.sum() == 4  # a new batch: the input is not edited


def test_nsr_single_step_redistributes_mass_by_the_prior():
    z = torch.tensor([2.0, 1.0, 0.0], requires_grad=True)
    logp_y = torch.log_softmax(z, -1)[0]
    adv = registry.build("advantage", "nsr")(make_batch([0.0]))  # incorrect -> A = -1
    loss = -adv[0] * logp_y  # REINFORCE with A = -1: loss = +logp_y
    loss.backward()
    dz = -1.0 * z.grad  # one gradient-descent step with eta = 1
    assert torch.allclose(dz, torch.tensor([-0.334759, 0.244728, 0.090031]), atol=1e-6)


def test_reasonmaxxer_advantage_uses_population_std_and_clips():
    batch = make_batch([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       group=[0] * 4 + [1] * 2 + [2] * 8)
    adv = registry.build("advantage", "reasonmaxxer")(batch)
    assert adv[:4].tolist() == pytest.approx([1.732051, -0.577350, -0.577350, -0.577350], abs=1e-5)
    assert adv[4:6].tolist() == [0.0, 0.0]  # all equal
    batch = make_batch([1.0] + [0.0] * 7)
    adv = registry.build("advantage", "reasonmaxxer")(batch)
    assert adv[0].item() == pytest.approx(2.5)  # 0.875 / 0.330719 = 2.6458 clipped at 2.5
    assert adv[1].item() == pytest.approx(-0.125 / 0.330719, abs=1e-5)


@pytest.mark.parametrize("name", ["psr", "nsr"])
def test_subset_advantages_are_batch_transforms(name):
    from policylab.interfaces import declared

    comp = registry.build("advantage", name)
    assert declared(comp, "requires") == ("rewards",) and declared(comp, "provides") == ()
    assert not hasattr(comp, "prepare")


@pytest.mark.parametrize("recipe", ["psr", "nsr", "w_reinforce", "reasonmaxxer"])
def test_recipes_chain(recipe):
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    parts = build_components(load_recipe(recipe))
    hooks = [n.hook for n in parts.plan.prepare if n.where == "algorithm.advantage"]
    assert hooks == (["transform"] if recipe in ("psr", "nsr") else [])
