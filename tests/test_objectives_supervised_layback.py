"""PIPO layback (arXiv:2604.00860): progress scale, coefficients, gate, and the joint update built by its batch transform."""

from __future__ import annotations

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.objectives.retrospective import (
    layback_coefficients,
    layback_gate,
    layback_token_losses,
    progress_scale,
)
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components

GATE = dict(window_len=8, has_cache=True, step=1, min_steps=8, every_n=1, threshold=0.0)


def test_coefficients_from_the_spec_example():
    rho, p, sigma, xi = progress_scale([0.4, 0.5, 0.6], 0.6)
    assert (rho, p) == pytest.approx((0.5, 0.1))
    assert sigma == pytest.approx(0.081650, abs=1e-6) and xi == pytest.approx(1.224745, abs=1e-6)
    coef = layback_coefficients(torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.zeros(4, dtype=torch.long), xi)
    assert torch.allclose(coef, torch.tensor([1.224745, -1.224745, 1.224745, -1.224745]), atol=1e-5)


def test_flat_window_single_entry_and_coefficient_clip():
    assert progress_scale([0.5, 0.5, 0.5], 0.7)[2] == 1.0
    assert progress_scale([0.3], 0.7)[2] == 1.0
    assert progress_scale([0.0, 0.0], 9.0)[1] == 5.0  # p clipped to 5
    coef = layback_coefficients(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), xi=5.0)
    assert coef.abs().max().item() == 10.0


def test_gate():
    assert layback_gate(p=-0.1, xi=-1.0, loss_scale_neg=0.0, **GATE) == 0.0
    assert layback_gate(p=-0.1, xi=-1.0, loss_scale_neg=0.1, **GATE) == 0.1
    assert layback_gate(p=0.1, xi=1.0, loss_scale_neg=0.1, **GATE) == 1.0
    assert layback_gate(p=0.1, xi=1.0, loss_scale_neg=0.0, **{**GATE, "window_len": 7}) == 0.0
    assert layback_gate(p=0.1, xi=1.0, loss_scale_neg=0.0, **{**GATE, "has_cache": False}) == 0.0
    assert layback_gate(p=0.1, xi=1.0, loss_scale_neg=0.0, **{**GATE, "step": 3, "every_n": 2}) == 0.0
    assert layback_gate(p=0.1, xi=0.5, loss_scale_neg=0.0, **{**GATE, "threshold": 0.6}) == 0.0


def test_layback_token_loss_uses_min_of_ratio_and_clipped_ratio():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    loss = layback_token_losses(logp, torch.zeros(1, 2), torch.tensor([2.0]), eps=0.2)
    assert loss.tolist()[0] == pytest.approx([-1.2 * 2.0, -0.5 * 2.0])


def make_batch(rewards, seed):
    b, width = len(rewards), 3
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (b,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return make_rollouts(
        rewards, lengths=lengths.tolist(), width=width, group=(torch.arange(b) // 2).tolist(), prompt_len=2,
        prompts=["p"] * b, completions=["c"] * b, rows=[{}] * b,
        behavior_logp=torch.log(torch.rand(b, width, generator=gen) * 0.8 + 0.1) * mask, extras={"max_new_tokens": 3},
    )


def run_steps(pipo, reward_lists):
    """What the loop does each step: the transform, the advantage, then the loss over the batch (which records
    the batch's advantages for the next layback)."""
    outs = []
    for k, rewards in enumerate(reward_lists):
        batch = pipo.transform(make_batch(rewards, seed=k), None)
        assert {f for f in declared(pipo, "provides")} <= set(batch.extras)
        batch.validate("pipo")
        batch.advantages = grpo_advantage(batch)
        pipo(PolicyOutputs(batch.behavior_logp.clone()), batch)
        outs.append(batch)
    return outs


def test_recipe_chains_with_the_transform_after_the_reference_scorer():
    parts = build_components(load_recipe("pipo"))
    nodes = {n.where: n for n in parts.plan.prepare}
    assert nodes["algorithm.objective"].hook == "transform"
    assert load_recipe("pipo").algorithm.aggregate.name in parts.update.objective.aggregates


def test_transform_appends_the_previous_batch_with_coefficients_and_exact_scales():
    pipo = registry.build("objective", "pipo", {"history_window": 3, "min_steps_before_layback": 2, "loss_scale_neg": 0.1})
    steps = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    outs = run_steps(pipo, steps)
    assert [o.batch_size for o in outs] == [4, 4, 8, 8]  # window of 2 means needed before the first layback
    third, fourth = outs[2], outs[3]
    # step 3: window [0.25, 0.5], mu 0.75 -> p 0.375, sigma 0.125, xi 3
    assert third.extras["pipo_xi_t"].item() == pytest.approx(3.0)
    previous = make_batch(steps[1], seed=1)
    lay = third.extras["pipo_layback"]
    assert lay.tolist() == [False] * 4 + [True] * 4
    assert third.group[lay].tolist() == [2, 2, 3, 3]  # offset past the current groups
    expected_coef = layback_coefficients(grpo_advantage(previous), previous.group, 3.0)
    assert torch.allclose(third.extras["pipo_coef"][lay], expected_coef)
    assert torch.allclose(third.extras["pipo_old_logp"][lay], previous.behavior_logp)
    # step 4: reward dropped -> layback at exactly loss_scale_neg
    assert fourth.extras["pipo_loss_scale"].item() == pytest.approx(0.1)

    logp = torch.log(torch.rand(8, 3, generator=torch.Generator().manual_seed(9)) * 0.8 + 0.1)
    for batch in (third, fourth):
        loss, metrics = pipo(PolicyOutputs(logp), batch)
        m = batch.completion_mask
        joint = registry.build("aggregate", "token-mean")(loss * m, m, Normaliser.of(m, 3))
        base_rows, lay_rows = torch.arange(4), torch.arange(4, 8)
        cur = batch.select(base_rows)
        base, _ = registry.build("objective", "ppo_clip")(PolicyOutputs(logp[base_rows]), cur)
        mc = cur.completion_mask
        expected = (base * mc).sum() / mc.sum()
        prev = batch.select(lay_rows)
        lay_loss = layback_token_losses(logp[lay_rows], prev.extras["pipo_old_logp"], prev.extras["pipo_coef"], 0.2)
        mp = prev.completion_mask
        expected = expected + batch.extras["pipo_loss_scale"] * (lay_loss * mp).sum() / mp.sum()
        assert joint.item() == pytest.approx(expected.item(), abs=1e-6)
        assert metrics["layback/rows_frac"].item() == 0.5


def test_code_compat_counts_the_current_mean_in_its_own_baseline():
    ours = registry.build("objective", "pipo", {"min_steps_before_layback": 1})
    compat = registry.build("objective", "pipo", {"min_steps_before_layback": 1, "pipo_code_compat": True})
    steps = [[1, 0, 0, 0], [1, 1, 1, 0]]
    a, b = run_steps(ours, steps), run_steps(compat, steps)
    assert a[1].extras["pipo_mu_his"].item() == pytest.approx(0.25)  # window [0.25]
    assert b[1].extras["pipo_mu_his"].item() == pytest.approx((0.25 + 0.25 + 0.75) / 3)  # [0.25, 0.25, 0.75]
    assert list(compat.window) == [0.25, 0.25, 0.75, 0.75]
    restored = registry.build("objective", "pipo")
    restored.load_state_dict(compat.state_dict())
    assert list(restored.window) == list(compat.window) and restored.cache.batch_size == 4
    assert torch.equal(restored.cache_adv, compat.cache_adv)


def test_rows_whose_advantage_the_loss_never_saw_get_no_layback_coefficient():
    pipo = registry.build("objective", "pipo", {"min_steps_before_layback": 1})
    first = pipo.transform(make_batch([1, 0, 0, 0], seed=0), None)
    first.advantages = grpo_advantage(first)
    seen = first.select([0, 1])  # a step that stopped after rows 0, 1
    pipo(PolicyOutputs(seen.behavior_logp.clone()), seen)
    second = pipo.transform(make_batch([1, 1, 0, 0], seed=1), None)
    coef = second.extras["pipo_coef"][second.extras["pipo_layback"]]
    assert coef[2:].tolist() == [0.0, 0.0] and (coef[:2] != 0).all()
