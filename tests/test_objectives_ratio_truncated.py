"""T-PPO (policylab/annotate/critics.py, policylab/algo/objectives/truncated_ppo.py) and the extended GAE it feeds
(policylab/algo/advantages/extended_gae.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.extended_gae import (
    CRITIC_BOOTSTRAP,
    CRITIC_RETURNS,
    CRITIC_VALUES,
    RESPONSE_FINISHED,
    finished_token_rewards,
    gae,
)
from policylab.algo.objectives.truncated_ppo import clipped_value_loss
from policylab.annotate.critics import ValueHead
from policylab.interfaces import declared
from policylab.rollouts import PolicyOutputs
from policylab.testing import make_rollouts
from test_objectives_ratio_common import aggregate, annotated, chain_builds, grad_of, make_batch

ONES3 = torch.ones(1, 3)


def test_egae_completed_response_with_gamma_lambda_one_is_return_minus_value():
    values = torch.tensor([[0.2, 0.5, 0.9]])
    rewards = finished_token_rewards(make_rollouts([1.0], lengths=[3]), torch.tensor([True]))
    adv, ret = gae(rewards, values, ONES3, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, 1.0 - values)
    assert torch.allclose(ret, torch.ones(1, 3))


def test_egae_truncated_with_constant_values_has_zero_advantages():
    values = torch.full((1, 3), 0.5)
    rewards = finished_token_rewards(make_rollouts([1.0], lengths=[3]), torch.tensor([False]))
    assert torch.all(rewards == 0)  # an unfinished response has no reward yet
    adv, _ = gae(rewards, values, ONES3, gamma=1.0, lam=0.95, bootstrap=torch.tensor([0.5]))
    assert torch.allclose(adv, torch.zeros(1, 3))


def test_egae_truncated_numbers():
    adv, _ = gae(torch.zeros(1, 3), torch.tensor([[0.2, 0.4, 0.6]]), ONES3, gamma=1.0, lam=0.5, bootstrap=torch.tensor([0.9]))
    assert torch.allclose(adv, torch.tensor([[0.375, 0.35, 0.3]]))


def test_gae_a6_numbers_and_masked_middle_token():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, ONES3, gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.46575, 0.385, 0.3]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.96575, 0.985, 1.0]]), atol=1e-6)
    adv, _ = gae(rewards, values, ONES3, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    # masked middle token: token 0 chains to token 2 (delta_0 = 0 + V_2 - V_0 = 0.2; A_0 = 0.2 + 0.95 * 0.3)
    adv, _ = gae(rewards, values, torch.tensor([[1.0, 0.0, 1.0]]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.2 + 0.95 * 0.3, 0.0, 0.3]]), atol=1e-6)


def test_clipped_value_loss_numbers():
    loss, clipped = clipped_value_loss(torch.tensor([1.5]), torch.tensor([0.5]), torch.tensor([1.0]), clip=0.5)
    assert float(loss) == pytest.approx(0.125) and not clipped.any()
    loss, clipped = clipped_value_loss(torch.tensor([0.2]), torch.tensor([0.0]), torch.tensor([2.0]), clip=0.1)
    assert float(loss) == pytest.approx(0.5 * 1.9**2) and clipped.all()
    loss, _ = clipped_value_loss(torch.tensor([0.2]), torch.tensor([0.0]), torch.tensor([2.0]), clip=None)
    assert float(loss) == pytest.approx(0.5 * 1.8**2)


def test_value_head_starts_at_zero():
    head = ValueHead(4)
    assert torch.all(head(torch.randn(2, 3, 4)) == 0)


# ---------------------------------------------------------------------------------------------------
# the component: annotate provides the critic's estimates, egae reads them, the call trains the head


HIDDEN = 4


def fake_hidden(ids, mask):
    """A deterministic 'model': the state before token t encodes the previous tokens (here: their count and sum)."""
    b, t = ids.shape
    prev = torch.cat([torch.zeros(b, 1), ids[:, :-1].float()], dim=1)
    csum = torch.cumsum(prev, dim=1)
    position = torch.arange(t).float().expand(b, t)
    return torch.stack([torch.ones(b, t), position / 4, csum / 10, prev / 5], dim=-1)


def fake_ctx():
    calls = []

    def score(rollouts, model=None, with_hidden=False):
        calls.append(rollouts)
        assert with_hidden
        hidden = fake_hidden(rollouts.completion_ids, rollouts.completion_mask)
        return PolicyOutputs(logp=torch.zeros(hidden.shape[:2]), hidden=hidden)

    return SimpleNamespace(score=score, step=0, device=None), calls


def tppo_batch():
    ids = torch.tensor([[3, 4, 5, 0], [3, 6, 7, 8]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    batch, leaf = make_batch(torch.full((2, 4), -1.0).tolist(), None, None, ids=ids, mask=mask, rewards=[1.0, 0.3],
                             truncated=[False, True])
    return batch, leaf


def test_tppo_annotate_scores_one_position_past_the_end_and_egae_bootstraps_truncated_rows():
    batch, _ = tppo_batch()
    objective = registry.build("objective", "t_ppo")
    ctx, calls = fake_ctx()
    annotated(objective, batch, ctx)
    with torch.no_grad():  # give the head a known non-zero value function
        objective.head.linear.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    prepared = annotated(objective, batch, ctx)
    scored = calls[-1]
    assert scored.completion_ids.shape[1] == 5 and scored.completion_mask[1, 4] == 1 and scored.completion_mask[0, 3] == 1
    values_all = objective.head(fake_hidden(scored.completion_ids, scored.completion_mask)).detach()
    assert torch.allclose(prepared.extras[CRITIC_VALUES], values_all[:, :4] * batch.completion_mask)
    assert prepared.extras[RESPONSE_FINISHED].tolist() == [True, False]
    assert float(prepared.extras[CRITIC_BOOTSTRAP][0]) == 0.0
    assert float(prepared.extras[CRITIC_BOOTSTRAP][1]) == pytest.approx(float(values_all[1, 4]))
    adv = registry.build("advantage", "egae", {"gamma": 1.0, "lam": 1.0})(prepared)
    # finished row: R - V(s_t); truncated row: V(s_4) - V(s_t), its reward ignored
    assert torch.allclose(adv[0, :3], 1.0 - values_all[0, :3], atol=1e-6)
    assert torch.allclose(adv[1], values_all[1, 4] - values_all[1, :4], atol=1e-6)
    # critic targets: lambda_critic = 1 -> MC return on finished rows
    assert torch.allclose(prepared.extras[CRITIC_RETURNS][0, :3], torch.ones(3), atol=1e-6)


def test_tppo_trains_its_value_head_on_finished_rows_only():
    batch, logp = tppo_batch()
    objective = registry.build("objective", "t_ppo", {"value_lr": 0.05, "value_clip": None})
    ctx, _ = fake_ctx()
    losses = []
    for _ in range(60):
        prepared = annotated(objective, batch, ctx)
        prepared.advantages = registry.build("advantage", "egae")(prepared)
        leaf = logp.detach().clone().requires_grad_(True)
        hidden = fake_hidden(batch.completion_ids, batch.completion_mask)
        loss, metrics = objective(PolicyOutputs(logp=leaf, hidden=hidden), prepared)
        aggregate(loss, prepared).backward()
        objective.after_step(metrics)
        losses.append(float(metrics["value/loss"]))
    assert losses[-1] < 0.05 * losses[0]
    values = objective.head(fake_hidden(batch.completion_ids, batch.completion_mask)).detach()
    assert torch.allclose(values[0, :3], torch.ones(3), atol=0.15)  # the finished row's return
    assert objective.head.linear.weight.grad is None  # after_step cleared it


def test_tppo_value_loss_does_not_reach_the_policy_and_without_annotate_it_is_ppo_clip():
    batch, logp = tppo_batch()
    batch.old_logp = logp - 0.3
    batch.advantages = torch.tensor([1.0, -1.0])
    leaf, ppo_leaf = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "t_ppo")(PolicyOutputs(logp=leaf), batch)
    ppo_loss, _ = registry.build("objective", "ppo_clip")(PolicyOutputs(logp=ppo_leaf), batch)
    assert torch.equal(loss, ppo_loss)
    objective = registry.build("objective", "t_ppo")
    ctx, _ = fake_ctx()
    prepared = annotated(objective, batch, ctx)
    hidden = fake_hidden(batch.completion_ids, batch.completion_mask).requires_grad_(True)
    loss, _ = objective(PolicyOutputs(logp=leaf, hidden=hidden), prepared)
    total = aggregate(loss, prepared)
    assert torch.allclose(grad_of(total, leaf), grad_of(aggregate(ppo_loss, batch), ppo_leaf))
    assert torch.autograd.grad(total, hidden, allow_unused=True)[0] is None  # detached trunk by default
    with pytest.raises(ValueError, match="hidden"):
        objective(PolicyOutputs(logp=leaf), prepared)


def test_tppo_state_round_trip_and_egae_needs_the_critic():
    batch, _ = tppo_batch()
    objective = registry.build("objective", "t_ppo")
    ctx, _ = fake_ctx()
    annotated(objective, batch, ctx)
    with torch.no_grad():
        objective.head.linear.weight.fill_(0.7)
    restored = registry.build("objective", "t_ppo")
    restored.load_state_dict(objective.state_dict())  # before the head exists: applied when it is built
    annotated(restored, batch, ctx)
    assert torch.equal(restored.head.linear.weight, objective.head.linear.weight)
    with pytest.raises(ValueError, match="critic"):
        registry.build("advantage", "egae")(batch)


def test_tppo_bootstrap_is_the_state_after_the_last_token_in_the_real_forward():
    """Guards the alignment the critic relies on: hidden[:, t] predicts token t, so position L is s_L."""
    from policylab import models
    from policylab.models.forward import policy_forward

    model, tok = models.load("tiny", seed=0)
    model.eval()
    prompt = tok(["1+2="], return_tensors="pt", add_special_tokens=False)
    completion = torch.tensor([[int(t) for t in tok("345", add_special_tokens=False).input_ids] + [tok.pad_token_id]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # three real tokens, one padding column
    batch, _ = make_batch(torch.zeros(1, 4).tolist(), None, None, ids=completion, mask=mask, rewards=[0.0],
                          truncated=[True])
    batch = batch.with_(prompt_ids=prompt.input_ids, prompt_mask=prompt.attention_mask.float())
    ctx = SimpleNamespace(score=lambda r, with_hidden=False: policy_forward(model, r, with_hidden=with_hidden), device=None)
    objective = registry.build("objective", "t_ppo")
    with torch.no_grad():
        annotated(objective, batch, ctx)
        torch.manual_seed(0)
        objective.head.linear.weight.normal_()
        prepared = annotated(objective, batch, ctx)
        full = torch.cat([prompt.input_ids, completion[:, :3]], dim=1)
        last_state = model.get_decoder()(input_ids=full).last_hidden_state[:, -1]
        expected = objective.head(last_state[:, None])[0, 0]
        first_state = model.get_decoder()(input_ids=prompt.input_ids).last_hidden_state[:, -1]
        expected_first = objective.head(first_state[:, None])[0, 0]
    assert float(prepared.extras[CRITIC_BOOTSTRAP][0]) == pytest.approx(float(expected), abs=1e-4)
    assert float(prepared.extras[CRITIC_VALUES][0, 0]) == pytest.approx(float(expected_first), abs=1e-4)


def test_tppo_declarations_and_its_recipes_chain():
    objective = registry.build("objective", "t_ppo")
    assert declared(objective, "requires") == ("rewards",)
    assert declared(objective, "provides") == (CRITIC_VALUES, CRITIC_BOOTSTRAP, RESPONSE_FINISHED, CRITIC_RETURNS)
    assert not hasattr(objective, "prepare")
    assert set(declared(registry.build("advantage", "egae"), "requires")) == {
        "rewards", CRITIC_VALUES, CRITIC_BOOTSTRAP, RESPONSE_FINISHED}
    for recipe in ("t_ppo", "ppo_gae"):  # the critic's fields reach the egae / gae advantage
        parts = chain_builds(recipe)
        assert parts.plan.provided[CRITIC_VALUES].startswith("algorithm.objective")
