"""REAL (§3.1), PACS (§3.2), NFT (§3.3): the spec's hand-computed numbers and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.algo.objectives.classification import (
    nft_token_losses,
    pacs_row_losses,
    real_prompt_losses,
)
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components


def make_batch(rewards, lengths, group, *, width=None, seed=0):
    width = width or max(lengths)
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(len(rewards), width, generator=gen) * 0.8 + 0.1)
    batch = make_rollouts(rewards, lengths=lengths, group=group, width=width, prompt_len=2, old_logp=logp.clone())
    return batch, logp


def seq_sum_total(loss, mask):
    return registry.build("aggregate", "seq-mean-token-sum")(loss * mask, mask, Normaliser.of(mask, 8))


# ---------------------------------------------------------------------------------------------------
# REAL


@pytest.mark.parametrize(
    "s, pos, loss, grad",
    [
        ([0.0, 0.0], [True, False], 2 * math.log(2), [-1.0, 1.0]),
        ([0.0, 0.0, 0.0], [True, True, False], math.log(3) + math.log(2), [-0.666667, -0.666667, 1.0]),
        ([0.2, -0.1], [True, False], 1.111154, [-0.802625, 0.900332]),
    ],
)
def test_real_prompt_loss_and_gradients_match_the_spec(s, pos, loss, grad):
    score = torch.tensor(s, requires_grad=True)
    positive = torch.tensor(pos)
    value, valid = real_prompt_losses(score, positive, ~positive, torch.zeros(len(s), dtype=torch.long), tau=0.5)
    value.sum().backward()
    assert valid.item()
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert torch.allclose(score.grad, torch.tensor(grad), atol=1e-6)


def test_real_gradient_is_bounded_by_one_over_tau():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        score = (torch.randn(6, generator=gen) * 3).requires_grad_(True)
        positive = torch.tensor([True, False, True, False, False, True])
        value, _ = real_prompt_losses(score, positive, ~positive, torch.zeros(6, dtype=torch.long), tau=0.5)
        value.sum().backward()
        assert score.grad.abs().max() < 1 / 0.5


def test_real_objective_end_to_end_counts_all_prompts_and_spreads_over_tokens():
    # prompt 0: one correct (2 tokens), one wrong (3 tokens); prompt 1 all correct -> adds 0 but counts in Q = 2
    batch, logp = make_batch([1.0, 0.0, 1.0, 1.0], [2, 3, 2, 1], [0, 0, 1, 1])
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = registry.build("objective", "real")(PolicyOutputs(leaf), batch)
    total = seq_sum_total(loss, batch.completion_mask)
    total.backward()
    assert total.item() == pytest.approx(2 * math.log(2) / 2, abs=1e-6)
    # dL/ds = (1/Q) * (-1/tau... ) = [-0.5, +0.5]; s_i = mean over L_i tokens
    expected = torch.zeros_like(logp)
    expected[0, :2] = -0.5 / 2
    expected[1, :3] = 0.5 / 3
    assert torch.allclose(leaf.grad, expected, atol=1e-6)
    assert metrics["real/valid_prompt_frac"].item() == pytest.approx(0.5)


def test_real_without_a_valid_prompt_gives_zero_loss_and_gradient_with_a_graph():
    batch, logp = make_batch([1.0, 1.0, 0.0, float("nan")], [2, 3, 2, 0], [0, 0, 1, 1])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "real")(PolicyOutputs(leaf), batch)
    total = seq_sum_total(loss, batch.completion_mask)
    total.backward()
    assert total.item() == 0.0 and torch.all(leaf.grad == 0)


def test_real_bce_variant_at_zero_score_is_ln2():
    batch, logp = make_batch([1.0, 0.0, 1.0, 1.0], [2, 3, 2, 1], [0, 0, 1, 1])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "real", {"variant": "bce"})(PolicyOutputs(leaf), batch)
    assert seq_sum_total(loss, batch.completion_mask).item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", ["real", "pacs", "nft"])
def test_declarations_chain_in_the_recipe_and_name_its_aggregation(name):
    parts = build_components(load_recipe(name))  # the chain check: every requires has a provider
    objective = parts.update.objective
    assert "rewards" in declared(objective, "requires")
    aggregates = getattr(objective, "aggregates", None)
    if aggregates is not None:
        assert load_recipe(name).algorithm.aggregate.name in aggregates
    assert not hasattr(objective, "prepare")
    assert getattr(objective, "needs_whole_groups", False) == (name in ("real", "pacs"))


# ---------------------------------------------------------------------------------------------------
# PACS


def test_pacs_spec_numbers_for_one_correct_of_four():
    label = torch.tensor([True, False, False, False])
    usable = torch.ones(4, dtype=torch.bool)
    group = torch.zeros(4, dtype=torch.long)
    # raw score: psi = r^, so the gradient w.r.t. r^ is dL/dpsi
    psi = torch.zeros(4, requires_grad=True)
    rows, _ = pacs_row_losses(psi, label, usable, group, score="raw")
    (rows.sum() / 4).backward()
    assert (rows.detach().sum() / 4).item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.allclose(psi.grad, torch.tensor([-0.25, 0.083333, 0.083333, 0.083333]), atol=1e-6)
    # class weights n/(2 count): [2, 2/3, 2/3, 2/3]
    assert torch.allclose(rows.detach() / math.log(2), torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]), atol=1e-6)
    # RLOO score: gradient w.r.t. the implicit reward
    r_hat = torch.zeros(4, requires_grad=True)
    rows, _ = pacs_row_losses(r_hat, label, usable, group, score="rloo")
    (rows.sum() / 4).backward()
    assert torch.allclose(r_hat.grad, torch.tensor([-0.333333, 0.111111, 0.111111, 0.111111]), atol=1e-6)
    assert r_hat.grad.sum().abs().item() < 1e-6


def test_pacs_all_equal_rewards_give_zero_gradient_at_psi_zero():
    r_hat = torch.zeros(4, requires_grad=True)
    rows, _ = pacs_row_losses(r_hat, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool),
                              torch.zeros(4, dtype=torch.long), score="rloo")
    rows.sum().backward()
    assert torch.allclose(r_hat.grad, torch.zeros(4), atol=1e-7)


def test_pacs_doubling_beta_doubles_the_initial_gradient():
    grads = []
    for beta in (1.0, 2.0):
        batch, logp = make_batch([1.0, 0.0, 0.0, 0.0], [2, 3, 1, 2], [0, 0, 0, 0])
        leaf = logp.clone().requires_grad_(True)
        loss, _ = registry.build("objective", "pacs", {"beta": beta})(PolicyOutputs(leaf), batch)
        seq_sum_total(loss, batch.completion_mask).backward()
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], 2 * grads[0], atol=1e-7)
    # on-policy end to end: d total / d logp[i,t] = beta * dL/dr^_i (a sum over tokens, no 1/L_i)
    assert torch.allclose(grads[0][0, :2], torch.full((2,), -0.333333), atol=1e-6)
    assert torch.allclose(grads[0][1, :3], torch.full((3,), 0.111111), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# NFT


def test_nft_on_policy_equals_dr_grpo_advantages():
    # rewards {1,0,0,0}: r^ = 0.25 -> token gradient -(1 - r^) on positives, +r^ on negatives
    batch, logp = make_batch([1.0, 0.0, 0.0, 0.0], [2, 3, 1, 2], [0, 0, 0, 0])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "nft")(PolicyOutputs(leaf), batch)
    (loss * batch.completion_mask).sum().backward()
    m = batch.completion_mask
    expected = torch.where(torch.arange(4)[:, None] == 0, -0.75, 0.25) * m
    assert torch.allclose(leaf.grad, expected, atol=1e-6)


def test_nft_negative_token_numbers_and_straight_through_clamp():
    rate = torch.tensor(0.25)
    for r_value, loss_value, slope in ((0.9, -0.032790, 0.322581), (1.1, 0.0, 0.333333)):
        ratio = torch.tensor(r_value, requires_grad=True)
        loss = nft_token_losses(ratio, torch.tensor(False), rate, normalize=0)
        loss.backward()
        assert loss.item() == pytest.approx(loss_value, abs=1e-6)
        assert ratio.grad.item() == pytest.approx(slope, abs=1e-6)
    ratio = torch.tensor(0.9, requires_grad=True)
    nft_token_losses(ratio, torch.tensor(False), rate, normalize=1).backward()
    assert ratio.grad.item() == pytest.approx(0.241935, abs=1e-6)


def test_nft_neg_weight_zero_is_rft_and_negative_is_refused():
    batch, logp = make_batch([1.0, 0.0, 0.0, 0.0], [2, 3, 1, 2], [0, 0, 0, 0])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "nft", {"neg_weight": 0.0})(PolicyOutputs(leaf), batch)
    (loss * batch.completion_mask).sum().backward()
    assert torch.all(leaf.grad[1:] == 0) and torch.all(leaf.grad[0, :2] != 0)
    with pytest.raises(ValueError, match="dapo"):
        registry.build("objective", "nft", {"neg_weight": -1.0})


def test_nft_annotation_makes_micro_batches_exact():
    nft = registry.build("objective", "nft")
    batch, logp = make_batch([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [2, 3, 1, 2, 3, 3], [0, 0, 0, 1, 1, 1])
    batch.old_logp = batch.old_logp + 0.1  # off-policy ratios
    fields = nft.annotate(batch, None)
    assert set(fields) == set(declared(nft, "provides")) == {"nft_correct_rate"}
    assert fields["nft_correct_rate"].tolist() == pytest.approx([1 / 3] * 3 + [2 / 3] * 3)
    batch = batch.with_(extras={**batch.extras, **fields})
    batch.validate("nft")
    leaf = logp.clone().requires_grad_(True)
    full, _ = nft(PolicyOutputs(leaf), batch)
    parts = []
    for rows in ([0, 3], [1, 2, 4, 5]):
        index = torch.tensor(rows)
        sub, _ = nft(PolicyOutputs(leaf[index]), batch.select(index))
        parts.append((index, sub))
    for index, sub in parts:
        assert torch.allclose(sub, full[index], atol=1e-7)


def test_nft_sequence_ratio_spreads_one_loss_per_sequence():
    batch, logp = make_batch([1.0, 0.0], [2, 3], [0, 0])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "nft", {"ratio_type": "sequence"})(PolicyOutputs(leaf), batch)
    (loss * batch.completion_mask).sum().backward()
    # on-policy, R_i = exp(sum_t d) = 1 with dR/dlogp_t = 1 at every token; r^ = 0.5, token sums give l_i:
    # positive row -(1 - r^) = -0.5 per token, negative row +r^ = +0.5 per token
    assert torch.allclose(leaf.grad[0, :2], torch.full((2,), -0.5), atol=1e-6)
    assert torch.allclose(leaf.grad[1, :3], torch.full((3,), 0.5), atol=1e-6)


def test_every_recipe_uses_the_aggregation_its_objective_is_written_for():
    from policylab.config import available_recipes

    for name in sorted(available_recipes()):
        recipe = load_recipe(name)
        objective = registry.build("objective", recipe.algorithm.objective.name, recipe.algorithm.objective.params)
        aggregates = getattr(objective, "aggregates", None)
        assert aggregates is None or recipe.algorithm.aggregate.name in aggregates, (name, aggregates)


def test_nft_sequence_ratio_is_clamped_only_from_above():
    # arXiv:2505.18116 and its code clamp the summed log-ratio at 10 only; a lower clamp at -20 zeroed the
    # gradient of a correct response whose log-ratio drifted below it (here -25: dL/dlogp_t = -(1 - r^) = -0.5)
    batch, logp = make_batch([1.0, 0.0], [2, 3], [0, 0])
    batch.old_logp = batch.old_logp.clone()
    batch.old_logp[0, :2] += 12.5  # row 0: sum_t (logp - old_logp) = -25
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "nft", {"ratio_type": "sequence"})(PolicyOutputs(leaf), batch)
    (loss * batch.completion_mask).sum().backward()
    assert torch.allclose(leaf.grad[0, :2], torch.full((2,), -0.5), atol=1e-5)
    # above 10 the ratio is clamped (value exp(10), no gradient), as in the paper
    batch.old_logp[0, :2] -= 25.0  # sum = +25
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "nft", {"ratio_type": "sequence"})(PolicyOutputs(leaf), batch)
    (loss * batch.completion_mask).sum().backward()
    assert torch.all(leaf.grad[0] == 0)


def test_nft_token_ratio_is_clamped_only_from_above():
    # token-level R = exp(min(logp - old_logp, 10)): a token at log-ratio -25 of a correct response keeps the
    # on-policy gradient -(1 - r^) = -0.5
    batch, logp = make_batch([1.0, 0.0], [2, 3], [0, 0])
    batch.old_logp = batch.old_logp.clone()
    batch.old_logp[0, 0] += 25.0
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "nft")(PolicyOutputs(leaf), batch)
    (loss * batch.completion_mask).sum().backward()
    assert leaf.grad[0, 0].item() == pytest.approx(-0.5, abs=1e-5)
