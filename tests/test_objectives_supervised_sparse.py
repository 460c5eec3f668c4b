"""ReasonMaxxer (arXiv:2605.06241): entropy gating, sign, the SFT limit, problem selection and the offline buffer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from policylab import registry
from policylab.algo.objectives.sparse_decisions import decision_token_losses, select_problems
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components


def make_batch(rewards, entropy, adv, group=None, lengths=None, seed=0):
    entropy = torch.tensor(entropy, dtype=torch.float32)
    b, width = entropy.shape
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(b, width, generator=gen) * 0.8 + 0.1)
    batch = make_rollouts(rewards, lengths=lengths or [width] * b, width=width, group=group or list(range(b)), prompt_len=2,
                          ref_logp=logp.clone() - 0.1, entropy=entropy, advantages=torch.tensor(adv, dtype=torch.float32))
    return batch, logp


def test_gating_is_strict_and_the_kl_anchor_covers_exactly_the_other_tokens():
    batch, logp = make_batch([1.0], [[1.4, 1.5, 0.3, 2.0]], [1.0], lengths=[3])
    rm = registry.build("objective", "reasonmaxxer", {"tau_pos": 1.4, "kl_weight": 0.2})
    loss, metrics = rm(PolicyOutputs(logp), batch)
    lengths = 3.0
    x = logp - batch.ref_logp  # = 0.1: k3 = e^x - 1 - x
    k3 = math.exp(0.1) - 1 - 0.1
    assert loss[0, 1].item() == pytest.approx(-logp[0, 1].item() * lengths / 1, abs=1e-6)  # the one decision token
    for t in (0, 2):  # entropy exactly tau, and low entropy: anchor tokens
        assert loss[0, t].item() == pytest.approx(0.2 * k3 * lengths / 2, abs=1e-6)
    assert loss[0, 3].item() == 0.0  # padding, even with high entropy
    assert metrics["reasonmaxxer/decision_frac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("reward, adv, sign", [(1.0, 1.0, -1.0), (0.0, -1.0, 1.0)])
def test_decision_token_sign(reward, adv, sign):
    batch, logp = make_batch([reward], [[2.0]], [adv])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "reasonmaxxer", {"kl_weight": 0.0})(PolicyOutputs(leaf), batch)
    loss.sum().backward()
    assert torch.sign(leaf.grad[0, 0]).item() == sign  # descent raises logp for A>0, lowers it for A<0


def test_no_kl_and_all_decision_tokens_with_a_equal_one_is_sft():
    batch, logp = make_batch([1.0, 1.0], [[2.0, 3.0, 2.5], [2.0, 2.0, 9.0]], [1.0, 1.0], lengths=[3, 2])
    loss, _ = registry.build("objective", "reasonmaxxer", {"kl_weight": 0.0})(PolicyOutputs(logp), batch)
    m = batch.completion_mask
    total = registry.build("aggregate", "seq-mean-token-mean")(loss * m, m, Normaliser.of(m, 8))
    sft = ((-(logp * m).sum(-1) / m.sum(-1)).mean())
    assert total.item() == pytest.approx(sft.item(), abs=1e-6)


def test_variants_delta_hinge_and_correct_sft():
    logp = torch.tensor([[-1.0, -1.0]])
    base = torch.tensor([[-1.2, -0.5]])  # delta = [0.2, -0.5]
    adv = torch.tensor([[2.0, -1.0]])
    hinge = decision_token_losses(logp, base, adv, objective="delta_hinge", beta_neg=0.5, margin=0.5)
    assert hinge[0].tolist() == pytest.approx([(0.5 - 0.2) * 2.0, 0.0])  # negative: relu(-0.5 + 0.5) = 0
    sft = decision_token_losses(logp, base, adv, objective="correct_sft", beta_neg=1.0, margin=0.5)
    assert sft.tolist() == [[1.0, 0.0]]
    ce = decision_token_losses(logp, base, adv, objective="adv_ce", beta_neg=0.5, margin=0.5)
    assert ce[0].tolist() == pytest.approx([2.0, -0.5])


def test_select_problems_keeps_mixed_problems_closest_to_half():
    rewards = torch.tensor([1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0.0])
    group = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4)
    # pass rates 0.75, 0.5, 1, 0, 0.25: group 1 first; 0 and 4 tie and keep batch order; 2 and 3 are not mixed
    assert select_problems(rewards, group).tolist() == [1, 0, 4]
    assert select_problems(rewards, group, max_problems=1).tolist() == [1]


def test_offline_buffer_is_the_first_batch_and_survives_a_checkpoint():
    batch, _ = make_batch([1.0, 0.0, 1.0, 1.0], [[2.0, 0.1]] * 4, [0.0] * 4, group=[0, 0, 1, 1])
    rm = registry.build("objective", "reasonmaxxer")
    assert declared(rm, "requires") == ("rewards", "ref_logp", "entropy")
    first = rm.transform(batch, SimpleNamespace(step=0))
    assert first.group.tolist() == [0, 0]  # only the mixed problem
    assert torch.equal(first.entropy, batch.entropy[:2])  # the base batch keeps its collection-time entropies
    later, _ = make_batch([0.0] * 3, [[1.0, 1.0]] * 3, [0.0] * 3)
    again = rm.transform(later, SimpleNamespace(step=1))
    assert again.batch_size == 2 and again.group.tolist() == [0, 0] and torch.equal(again.entropy, first.entropy)
    restored = registry.build("objective", "reasonmaxxer")
    restored.load_state_dict(rm.state_dict())
    assert restored.transform(later, SimpleNamespace(step=5)).rewards.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="policy has moved"):
        registry.build("objective", "reasonmaxxer").transform(later, SimpleNamespace(step=3))


def test_online_variant_reads_the_reference_entropies():
    rm = registry.build("objective", "reasonmaxxer", {"offline": False})
    assert declared(rm, "requires") == ("rewards", "ref_logp", "base_entropy")
    batch, logp = make_batch([1.0], [[0.0, 0.0]], [1.0])
    gated = batch.with_(extras={"base_entropy": torch.tensor([[2.0, 0.0]])})
    loss, metrics = rm(PolicyOutputs(logp), gated)
    assert metrics["reasonmaxxer/decision_frac"].item() == pytest.approx(0.5)  # the collection entropy is ignored
    with pytest.raises(ValueError, match="base_entropy"):
        rm(PolicyOutputs(logp), batch)
    annotator = registry.build("annotator", "base_entropy")

    def score(rollouts, model=None, with_hidden=False):
        assert model is ctx.reference
        mask = rollouts.completion_mask
        return PolicyOutputs(logp=torch.zeros_like(mask), entropy=torch.full_like(mask, 0.7))

    ctx = SimpleNamespace(reference=object(), score=score)
    fields = annotator.annotate(batch, ctx)
    assert set(fields) == set(declared(annotator, "provides")) and torch.all(fields["base_entropy"] == 0.7)


@pytest.mark.parametrize("offline", [True, False])
def test_recipe_chains_with_the_base_fields_before_the_problem_selection(offline):
    parts = build_components(load_recipe("reasonmaxxer", {"algorithm.objective.offline": offline}))
    order = [n.provides for n in parts.plan.prepare]
    base = ("entropy",) if offline else ("base_entropy",)
    assert order.index(base) < order.index(()) and order.index(("ref_logp",)) < order.index(())
    assert parts.plan.needs_reference_model
    assert load_recipe("reasonmaxxer").algorithm.aggregate.name in parts.update.objective.aggregates
