"""KL estimators and controller (advantages_rewards.md E1; objectives.md §1.1) and the entropy bonus (E2):
policylab.algo.regularizers.divergence / .entropy."""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.algo.regularizers.divergence import adaptive_kl_beta, kl_estimate
from policylab.algo.regularizers.entropy import token_entropy_from_logits
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components

LN2 = math.log(2.0)


def make_batch(mask, ref_logp=None):
    """Rollouts with the given right-padded completion mask (and reference log-probs)."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    return make_rollouts(lengths=mask.sum(-1).long().tolist(), width=mask.shape[1], ref_logp=ref_logp)


def value_and_grad(estimator, lp=math.log(0.5), lr=math.log(0.25)):
    logp = torch.tensor(lp, requires_grad=True)
    k = kl_estimate(logp, torch.tensor(lr), estimator)
    (grad,) = torch.autograd.grad(k, logp)
    return float(k.detach()), float(grad)


# ---------------------------------------------------------------------------------------------------
# E1 T1/T2: values and gradients at lp = ln 0.5, lr = ln 0.25


@pytest.mark.parametrize(
    "estimator, value, grad",
    [
        ("k1", 0.693147, 1.0),
        ("k2", 0.240227, 0.693147),
        ("k3", 0.193147, 0.5),  # 1 - e^delta with delta = lr - lp = ln 0.5
        ("k3+", 0.193147, 0.693147),  # value of k3, gradient of k2 (lp - lr)
        ("k1+", 0.693147, 0.693147),
        ("abs", 0.693147, 1.0),
        ("kl", 0.693147, 1.0),  # aliases
        ("mse", 0.240227, 0.693147),
        ("low_var_kl", 0.193147, 0.5),
    ],
)
def test_E1_values_and_gradients(estimator, value, grad):
    v, g = value_and_grad(estimator)
    assert v == pytest.approx(value, abs=1e-6)
    assert g == pytest.approx(grad, abs=1e-6)


def test_E1_abs_of_a_negative_difference():
    v, g = value_and_grad("abs", lp=math.log(0.25), lr=math.log(0.5))
    assert (v, g) == (pytest.approx(LN2, abs=1e-6), pytest.approx(-1.0))


def test_E1_k3_is_clamped_and_nonnegative():
    # delta clamped to [-20, 20], k3 clamped to [-10, 10]: no inf, flat (zero gradient) once clamped
    for lp, lr in ((0.0, -30.0), (-30.0, 0.0)):
        v, g = value_and_grad("k3", lp, lr)
        assert v == 10.0 and g == 0.0
    x = torch.linspace(-5, 5, 41)
    assert (kl_estimate(torch.zeros(41), x, "k3") >= 0).all()


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
    with pytest.raises(ValueError, match="k4"):
        registry.build("regularizer", "kl", {"estimator": "k4"})


# ---------------------------------------------------------------------------------------------------
# objectives.md §1.1: expected gradients on a 3-way categorical, exact by enumeration

Z = [0.3, -0.2, 0.5]
REF_LOGITS = [0.1, 0.4, -0.3]


def expected_estimator_grad(estimator, through_regularizer=False, beta=1.0):
    """sum_y pi(y) * grad_z k(y), with the weights pi(y) treated as constants."""
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, -1)
    ref = torch.log_softmax(torch.tensor(REF_LOGITS, dtype=torch.float64), -1)
    weights = logp.detach().exp()
    if through_regularizer:  # one row per outcome y, T = 1
        reg = registry.build("regularizer", "kl", {"beta": beta, "estimator": estimator})
        loss, _ = reg(PolicyOutputs(logp=logp[:, None]), make_batch(torch.ones(3, 1), ref_logp=ref[:, None]))
        per_outcome = loss[:, 0]
    else:
        per_outcome = kl_estimate(logp, ref, estimator)
    (grad,) = torch.autograd.grad((weights * per_outcome).sum(), z)
    return grad


def true_kl_grads():
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, -1)
    ref = torch.log_softmax(torch.tensor(REF_LOGITS, dtype=torch.float64), -1)
    reverse = (logp.exp() * (logp - ref)).sum()  # KL(pi || pi_ref)
    forward = (ref.exp() * (ref - logp)).sum()  # KL(pi_ref || pi)
    (g_reverse,) = torch.autograd.grad(reverse, z, retain_graph=True)
    (g_forward,) = torch.autograd.grad(forward, z)
    return g_reverse, g_forward


@pytest.mark.parametrize("through_regularizer", [False, True], ids=["kl_estimate", "kl regularizer"])
def test_categorical_expected_gradients(through_regularizer):
    g_reverse, g_forward = true_kl_grads()
    assert not torch.allclose(g_reverse, g_forward, atol=1e-3)  # the two directions are distinguishable here
    assert g_reverse.abs().max() > 1e-2
    e = lambda name: expected_estimator_grad(name, through_regularizer)  # noqa: E731
    assert torch.allclose(e("k1"), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(e("k2"), g_reverse, atol=1e-10)
    assert torch.allclose(e("k3"), g_forward, atol=1e-10)
    assert torch.allclose(e("k1+"), g_reverse, atol=1e-10)
    assert torch.allclose(e("k3+"), g_reverse, atol=1e-10)


def test_kl_regularizer_scales_by_beta():
    g_reverse, _ = true_kl_grads()
    assert torch.allclose(expected_estimator_grad("k2", True, beta=0.04), 0.04 * g_reverse, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# the kl regularizer component


def test_kl_regularizer_loss_and_metrics():
    logp = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.5), -3.0]])
    ref = torch.full((2, 2), math.log(0.25))
    batch = make_batch([[1, 1], [1, 0]], ref_logp=ref)
    reg = registry.build("regularizer", "kl", {"beta": 0.04, "estimator": "k1"})
    assert declared(reg, "requires") == ("ref_logp",)
    loss, metrics = reg(PolicyOutputs(logp=logp), batch)
    assert torch.allclose(loss[batch.completion_mask > 0], torch.full((3,), 0.04 * LN2))
    assert float(metrics["kl"]) == pytest.approx(LN2, abs=1e-6)  # masked mean: the padded -3.0 is ignored
    assert float(metrics["kl/beta"]) == pytest.approx(0.04)


def test_kl_regularizer_off_needs_no_reference():
    reg = registry.build("regularizer", "kl", {"beta": 0.0})
    assert declared(reg, "requires") == ()
    loss, _ = reg(PolicyOutputs(logp=torch.zeros(2, 3)), make_batch(torch.ones(2, 3)))
    assert torch.equal(loss, torch.zeros(2, 3))


def test_kl_regularizer_without_reference_logp_is_a_clear_error():
    reg = registry.build("regularizer", "kl", {"beta": 0.1})
    with pytest.raises(ValueError, match="ref_logp"):
        reg(PolicyOutputs(logp=torch.zeros(1, 2)), make_batch(torch.ones(1, 2)))


# ---------------------------------------------------------------------------------------------------
# E1 T3: adaptive controller


def test_E1_T3_adaptive_kl_beta():
    assert adaptive_kl_beta(0.1, 12.0, 6.0, 1, 10000) == pytest.approx(0.100002, abs=1e-12)


def test_adaptive_kl_error_is_clipped_both_ways():
    assert adaptive_kl_beta(0.1, 0.0, 6.0, 100, 10000) == pytest.approx(0.1 * (1 - 0.2 * 0.01), abs=1e-12)
    assert adaptive_kl_beta(0.1, 6.6, 6.0, 100, 10000) == pytest.approx(0.1 * (1 + 0.1 * 0.01), abs=1e-12)
    assert adaptive_kl_beta(0.1, 6.0, 6.0, 100, 10000) == pytest.approx(0.1, abs=1e-15)
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_beta(0.1, 1.0, 0.0, 1, 10000)


def test_kl_regularizer_adaptive_controller():
    reg = registry.build("regularizer", "kl", {"beta": 0.1, "estimator": "k1", "controller": "adaptive",
                                                "target_kl": 6.0, "horizon": 10000})
    # two sequences with k1 = 12 on every trained token (padding ignored), in two micro-batches
    logp = torch.zeros(2, 3)
    ref = torch.full((2, 3), -12.0)
    ref[1, 2] = 0.0  # padding: would pull the mean KL down if counted
    batch = make_batch([[1, 1, 1], [1, 1, 0]], ref_logp=ref)
    reg(PolicyOutputs(logp=logp[:1]), batch.select([0]))
    reg(PolicyOutputs(logp=logp[1:]), batch.select([1]))
    reg.after_step({"entropy": 1.0})
    assert reg.beta == pytest.approx(0.1 * (1 + 0.2 * 2 / 10000), abs=1e-12)
    reg.after_step({})  # nothing seen since: unchanged
    assert reg.beta == pytest.approx(0.1 * (1 + 0.2 * 2 / 10000), abs=1e-12)
    fresh = registry.build("regularizer", "kl", {"beta": 0.5, "controller": "adaptive", "target_kl": 6.0})
    fresh.load_state_dict(reg.state_dict())
    assert fresh.beta == reg.beta


def test_kl_regularizer_fixed_controller_never_moves():
    reg = registry.build("regularizer", "kl", {"beta": 0.1, "estimator": "k1"})
    reg(PolicyOutputs(logp=torch.zeros(1, 2)), make_batch(torch.ones(1, 2), ref_logp=torch.full((1, 2), -12.0)))
    reg.after_step({})
    assert reg.beta == 0.1
    with pytest.raises(ValueError, match="controller"):
        registry.build("regularizer", "kl", {"controller": "pid"})


# ---------------------------------------------------------------------------------------------------
# E2 entropy bonus


def test_E2_T1_entropy_from_logits():
    assert float(token_entropy_from_logits(torch.tensor([0.0, 0.0]))) == pytest.approx(LN2, abs=1e-6)
    assert float(token_entropy_from_logits(torch.full((4,), 3.7))) == pytest.approx(math.log(4), abs=1e-6)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 10.0, -10.0]])
    p = torch.softmax(logits, -1)
    assert torch.allclose(token_entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-5)


@pytest.mark.parametrize("as_dict", [True, False], ids=["metrics dict (loop contract)", "bare float"])
def test_E2_T2_adaptive_coefficient(as_dict):
    bonus = registry.build("regularizer", "entropy", {"coef": 0.01, "adaptive": True, "target": 0.2, "delta": 0.005})
    bonus.after_step({"entropy": 0.1} if as_dict else 0.1)
    assert bonus.coef == pytest.approx(0.015)
    bonus.after_step({"entropy": 0.3} if as_dict else 0.3)  # above target: back down
    assert bonus.coef == pytest.approx(0.01)


def test_E2_adaptive_coefficient_is_clipped_and_uses_the_last_seen_entropy():
    bonus = registry.build("regularizer", "entropy", {"coef": 0.002, "adaptive": True, "target": 0.2, "delta": 0.005,
                                                     "coef_min": 0.0, "coef_max": 0.006})
    bonus.after_step(0.5)
    assert bonus.coef == 0.0
    bonus.after_step(0.1), bonus.after_step(0.1)
    assert bonus.coef == pytest.approx(0.006)
    # no entropy in the metrics: the mean seen in the last call is used (0.05 < target -> up, capped)
    bonus.coef = 0.0
    bonus(PolicyOutputs(logp=torch.zeros(1, 2), entropy=torch.tensor([[0.05, 9.0]])), make_batch([[1, 0]]))
    bonus.after_step({})
    assert bonus.coef == pytest.approx(0.005)
    restored = registry.build("regularizer", "entropy", {"adaptive": True})
    restored.load_state_dict(bonus.state_dict())
    assert restored.coef == bonus.coef


def test_E2_bonus_sign_and_adaptive_gate():
    entropy = torch.tensor([[0.1, 0.1, 5.0]], requires_grad=True)
    batch = make_batch([[1, 1, 0]])
    bonus = registry.build("regularizer", "entropy", {"coef": 0.01})
    assert bonus.needs_entropy_grad
    loss, _ = bonus(PolicyOutputs(logp=torch.zeros(1, 3), entropy=entropy), batch)
    (grad,) = torch.autograd.grad((loss * batch.completion_mask).sum(), entropy)
    assert torch.allclose(grad, torch.tensor([[-0.01, -0.01, 0.0]]))  # minimising the loss raises entropy
    gated = registry.build("regularizer", "entropy", {"coef": 0.01, "adaptive": True, "target": 0.2})
    loss, _ = gated(PolicyOutputs(logp=torch.zeros(1, 3), entropy=entropy), batch)  # mean H 0.1 <= target: on
    assert torch.allclose(loss * batch.completion_mask, torch.tensor([[-0.001, -0.001, 0.0]]))
    high = torch.tensor([[0.5, 0.5, 0.0]])
    loss, _ = gated(PolicyOutputs(logp=torch.zeros(1, 3), entropy=high), batch)  # mean H 0.5 > target: off
    assert torch.all(loss == 0)


def test_E2_T3_zero_coefficient_leaves_the_policy_loss_unchanged():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 3, generator=gen).requires_grad_(True)
    entropy = torch.rand(2, 3, generator=gen).requires_grad_(True)
    batch = make_batch([[1, 1, 1], [1, 1, 0]])
    pg = -logp * torch.tensor([[1.0], [-0.5]])
    bonus = registry.build("regularizer", "entropy", {"coef": 0.0})
    extra, _ = bonus(PolicyOutputs(logp=logp, entropy=entropy), batch)
    total = ((pg + extra) * batch.completion_mask).sum()
    reference = (pg * batch.completion_mask).sum()
    assert torch.equal(total, reference)
    g_total = torch.autograd.grad(total, [logp, entropy], allow_unused=True, retain_graph=True)
    g_ref = torch.autograd.grad(reference, [logp], retain_graph=True)
    assert torch.equal(g_total[0], g_ref[0])
    assert g_total[1] is None or torch.all(g_total[1] == 0)


def test_E2_missing_entropy_is_a_clear_error():
    with pytest.raises(ValueError, match="entropy"):
        registry.build("regularizer", "entropy")(PolicyOutputs(logp=torch.zeros(1, 2)), make_batch([[1, 1]]))


# ---------------------------------------------------------------------------------------------------
# declarations: the loader gives kl the reference scorer, the recipes chain


def test_kl_recipe_chains_with_the_reference_scorer():
    parts = build_components(load_recipe("grpo"))
    assert parts.plan.needs_reference_model
    assert "ref_logp" in parts.plan.provided and "reference_logp" in parts.plan.provided["ref_logp"]
    assert not build_components(load_recipe("grpo", {"algorithm.regularizers": [{"name": "kl", "beta": 0.0}]})
                                ).plan.needs_reference_model


@pytest.mark.parametrize("estimator, grad", [("k1", 1.0), ("k2", -25.0), ("abs", -1.0), ("k1+", -25.0), ("k3+", -25.0)])
def test_only_k3_clamps_the_log_ratio_by_default(estimator, grad):
    # verl kl_penalty / Schulman's k3 note: only k3 clamps x = ref - logp (to +-20); k2 at x = 25 keeps its gradient
    v, g = value_and_grad(estimator, lp=0.0, lr=25.0)
    assert g == pytest.approx(grad, rel=1e-6)
    assert value_and_grad("k3", lp=0.0, lr=25.0) == (10.0, 0.0)  # k3 itself still clamped (x, then the value)


def test_log_ratio_clamp_is_an_option_per_estimator():
    logp = torch.tensor(0.0, requires_grad=True)
    k2 = kl_estimate(logp, torch.tensor(25.0), "k2", log_ratio_clamp=20.0)
    assert float(k2.detach()) == pytest.approx(200.0)
    (g,) = torch.autograd.grad(k2, logp)
    assert float(g) == 0.0  # clamped: flat
    k3 = kl_estimate(torch.tensor(0.0), torch.tensor(-30.0), "k3", log_ratio_clamp=math.inf)
    assert float(k3) == pytest.approx(min(math.exp(-30) - 1 + 30, 10.0))
    reg = registry.build("regularizer", "kl", {"beta": 1.0, "estimator": "k2", "log_ratio_clamp": 20.0})
    loss, _ = reg(PolicyOutputs(logp=torch.zeros(1, 1)), make_batch(torch.ones(1, 1), ref_logp=torch.full((1, 1), 25.0)))
    assert float(loss[0, 0]) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        registry.build("regularizer", "kl", {"log_ratio_clamp": 0.0})
