"""CAPO-curvature token mask (objectives.md §2.9): the spec's numbers and monotonicity
(policylab.algo.token_weights.capo_curvature; its output-layer binding in policylab.annotate.output_layer)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from policylab import registry
from policylab.algo.token_weights.capo_curvature import (
    adam_direction,
    capo_keep_mask,
    capo_predictions,
    capo_token_gradients,
)
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import PolicyOutputs
from policylab.train.components import build_components
from test_objectives_ratio_common import annotated, make_batch

PI = torch.tensor([[0.7, 0.2, 0.1]])
ONEHOT = torch.tensor([[1.0, 0.0, 0.0]])


def test_capo_spec_numbers_with_the_sgd_model():
    h, adv = torch.tensor([[1.0]]), torch.tensor([1.0])
    grad = capo_token_gradients(h, PI, ONEHOT, adv)
    assert float((grad * grad).sum()) == pytest.approx(0.14)
    delta_j, kl = capo_predictions(grad, grad, h, PI, ONEHOT, adv, lr=0.1)
    assert float(delta_j) == pytest.approx(0.013866, abs=1e-7)
    assert float(kl) == pytest.approx(9.8e-5, abs=1e-10)
    assert not capo_keep_mask(delta_j, kl, tau_hessian=0.01, tau_fisher=1e-4)
    assert capo_keep_mask(delta_j, kl, tau_hessian=0.02, tau_fisher=1e-4)
    assert not capo_keep_mask(delta_j, kl, tau_hessian=0.02, tau_fisher=5e-5)
    # Hessian term alone: 0.5 * lr^2 * A * ((v.u)^2 - u^T F u) = 0.005 * (0.0196 - 0.0464)
    assert float(delta_j) - 0.1 * 0.14 == pytest.approx(0.005 * -0.0268, abs=1e-8)


def test_capo_nonsymmetric_test_rejects_predicted_decreases():
    assert capo_keep_mask(torch.tensor([0.005]), torch.zeros(1), 0.01, 1.0, symmetric=False)
    assert not capo_keep_mask(torch.tensor([-0.005]), torch.zeros(1), 0.01, 1.0, symmetric=False)
    assert capo_keep_mask(torch.tensor([-0.005]), torch.zeros(1), 0.01, 1.0, symmetric=True)


def test_adam_direction_from_empty_moments_is_nearly_the_sign():
    grad = torch.tensor([[[0.3, -2.0, 0.0]]])
    zeros = torch.zeros_like(grad)
    direction = adam_direction(grad, zeros, zeros, step=0, beta1=0.9, beta2=0.999, eps=1e-8)
    assert torch.allclose(direction, torch.sign(grad), atol=1e-6)
    m = torch.full_like(grad, 0.1)
    v = torch.full_like(grad, 0.04)
    direction = adam_direction(grad, m, v, step=1, beta1=0.9, beta2=0.999, eps=1e-8)
    m2, v2 = 0.9 * 0.1 + 0.1 * grad, 0.999 * 0.04 + 0.001 * grad**2
    assert torch.allclose(direction, (m2 / (1 - 0.81)) / ((v2 / (1 - 0.999**2)).sqrt() + 1e-8))


class Head(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


def policy_with_head(weight):
    return SimpleNamespace(get_output_embeddings=lambda: Head(weight))


def capo_component(weight, lr, **params):
    component = registry.build("token_weights", "capo_curvature", {"lr": lr, **params})
    component.annotate(None, SimpleNamespace(policy=policy_with_head(weight), temperature=1.0))
    return component


def test_capo_component_reproduces_the_spec_token():
    weight = torch.log(PI).T  # [V=3, H=1]: logits = h * log(pi) with h = 1 give softmax = pi
    batch, leaf = make_batch([[0.0]], None, [1.0], ids=[[0]])
    hidden = torch.ones(1, 1, 1)
    for tau_h, tau_f, kept in [(0.01, 1e-4, 0.0), (0.02, 1e-4, 1.0), (0.02, 5e-5, 0.0)]:
        component = capo_component(weight, 0.1, optimizer_model="sgd", top_k=3, tau_hessian=tau_h, tau_fisher=tau_f)
        weights, metrics = component(PolicyOutputs(logp=leaf, hidden=hidden), batch)
        assert float(weights) == kept
        assert float(metrics["capo/masked"]) == 1 - kept


def test_capo_divides_logits_by_the_rollout_temperature_like_the_training_forward():
    weight = 2 * torch.log(PI).T  # at temperature 2 the policy is again pi = [0.7, 0.2, 0.1]
    component = registry.build("token_weights", "capo_curvature",
                               {"lr": 0.1, "optimizer_model": "sgd", "top_k": 3, "tau_hessian": 0.02})
    batch, leaf = make_batch([[0.0]], None, [1.0], ids=[[0]])
    assert annotated(component, batch, SimpleNamespace(policy=policy_with_head(weight), temperature=2.0)).extras == batch.extras
    _, metrics = component(PolicyOutputs(logp=leaf, hidden=torch.ones(1, 1, 1)), batch)
    assert float(metrics["capo/kl"]) == pytest.approx(9.8e-5, rel=1e-4)


def random_token_batch(seed=0, vocab=12, hidden_size=4, b=3, t=5):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    hidden = torch.randn(b, t, hidden_size, generator=gen)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.ones(b, t)
    mask[2, 3:] = 0
    batch, leaf = make_batch(torch.zeros(b, t).tolist(), None, [1.0, -0.5, 2.0], ids=ids, mask=mask)
    return weight, hidden, batch, leaf


@pytest.mark.parametrize("model", ["sgd", "adam"])
def test_capo_masks_shrink_as_thresholds_grow_and_vanish_as_lr_goes_to_zero(model):
    weight, hidden, batch, leaf = random_token_batch()
    kept_counts = []
    for tau in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, math.inf):
        component = capo_component(weight, 1.0, optimizer_model=model, top_k=5, tau_hessian=tau, tau_fisher=tau)
        weights, _ = component(PolicyOutputs(logp=leaf, hidden=hidden), batch)
        kept_counts.append(float((weights * batch.completion_mask).sum()))
    assert kept_counts == sorted(kept_counts) and kept_counts[0] < kept_counts[-1]
    assert kept_counts[-1] == float(batch.completion_mask.sum())  # tau = inf: the base loss untouched
    component = capo_component(weight, 1e-9, optimizer_model=model, top_k=5)
    weights, _ = component(PolicyOutputs(logp=leaf, hidden=hidden), batch)
    assert torch.equal(weights * batch.completion_mask, batch.completion_mask)


def test_capo_optimizer_model_moments_follow_the_kept_gradients():
    weight, hidden, batch, leaf = random_token_batch()
    component = capo_component(weight, 1e-6, top_k=3)  # tiny lr: every token kept
    component(PolicyOutputs(logp=leaf, hidden=hidden), batch)
    expected_sum = torch.zeros_like(weight)
    counts = torch.zeros(weight.shape[0])
    valid = batch.completion_mask > 0
    h = hidden[valid]
    logits = h @ weight.T
    top, ids = logits.topk(3, dim=-1)
    probs = torch.softmax(top, dim=-1)
    onehot = (ids == batch.completion_ids[valid][:, None]).float()
    adv = batch.seq_advantages()[valid]
    grads = adv[:, None, None] * (onehot - probs)[:, :, None] * h[:, None, :]
    expected_sum.index_add_(0, ids.reshape(-1), grads.reshape(-1, weight.shape[1]))
    counts.index_add_(0, ids.reshape(-1), torch.ones(ids.numel()))
    component.after_step({"lr": 0.5})
    touched = counts > 0
    assert torch.allclose(component.m[touched], 0.1 * expected_sum[touched] / counts[touched][:, None], atol=1e-6)
    assert torch.all(component.m[~touched] == 0)
    assert component.step == 1 and component.lr == 0.5
    restored = registry.build("token_weights", "capo_curvature", {"lr": 0.1})
    restored.load_state_dict(component.state_dict())
    assert torch.equal(restored.m, component.m) and restored.step == 1


def test_capo_needs_hidden_states_and_the_output_embedding():
    component = registry.build("token_weights", "capo_curvature", {"lr": 0.1})
    assert component.needs_hidden
    batch, leaf = make_batch([[0.0]], None, [1.0])
    with pytest.raises(ValueError, match="hidden"):
        component(PolicyOutputs(logp=leaf), batch)
    with pytest.raises(ValueError, match="output embedding"):
        component(PolicyOutputs(logp=leaf, hidden=torch.ones(1, 1, 2)), batch)
    with pytest.raises(ValueError, match="optimizer_model"):
        registry.build("token_weights", "capo_curvature", {"optimizer_model": "lion"})
    with pytest.raises(ValueError, match="lr"):  # the optimizer's lr is not reachable from token weights
        capo_component(torch.ones(3, 2), None)(PolicyOutputs(logp=leaf, hidden=torch.ones(1, 1, 2)), batch)


def test_capo_declares_no_fields_and_its_recipe_chains():
    component = registry.build("token_weights", "capo_curvature", {"lr": 0.1})
    assert declared(component, "provides") == () and declared(component, "requires") == ()
    parts = build_components(load_recipe("capo_curvature"))
    assert [n.where for n in parts.plan.prepare] == ["algorithm.token_weights.0"]
