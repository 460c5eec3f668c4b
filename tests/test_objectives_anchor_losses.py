"""Hand-computed numbers of the losses the anchors ship and policylab lacked (issue 15 §10): SAPO, VESPO, GMPO,
LUSPO, GPG, Clip-Cov, KL-Cov, DPPO-TV/KL. Each is checked against the formula its anchor documents (TRL
GRPOConfig.loss_type docs, verl core_algos, prime-rl docs/algorithms.md); the shared properties (on-policy =
REINFORCE, zero advantage = zero gradient, padding, micro-batches) are in test_objective_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.config import load_recipe
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import logp_batch as make_batch, make_rollouts
from policylab.train.components import build_components




def run(name, batch, leaf, **params):
    return registry.build("objective", name, params)(PolicyOutputs(logp=leaf), batch)


def token(p_new, p_old, adv, name, **params):
    """(per-token loss, d loss / d logp) for one token."""
    batch, leaf = make_batch([[math.log(p_new)]], [[math.log(p_old)]], [adv])
    loss, _ = run(name, batch, leaf, **params)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return float(loss[0, 0].detach()), float(grad[0, 0])


def aggregated(name, batch, leaf, aggregate, **params):
    loss, metrics = run(name, batch, leaf, **params)
    mask = batch.completion_mask
    total = registry.build("aggregate", aggregate)(loss * mask, mask, Normaliser.of(mask, 8))
    (grad,) = torch.autograd.grad(total, leaf)
    return float(total.detach()), grad, metrics


# -- SAPO (TRL: soft_coef = sigmoid(tau (coef - 1)) * 4 / tau, per_token_loss = -soft_coef * A) -----------------


def test_sapo_matches_trls_gate_by_hand():
    # A = +1, rho = 1.5, tau_pos = 1: l = -4 sigmoid(0.5) = -2.48984; dl/dlogp = -rho * 4 s (1 - s) = -1.41002
    loss, grad = token(0.75, 0.5, 1.0, "sapo")
    assert loss == pytest.approx(-2.4898373, rel=1e-5) and grad == pytest.approx(-1.4100223, rel=1e-5)
    # A = -1, rho = 0.8, tau_neg = 1.05: l = +sigmoid(1.05 * -0.2) * 4 / 1.05 = 1.70549; grad = 0.8 * 4 s (1 - s)
    loss, grad = token(0.4, 0.5, -1.0, "sapo")
    assert loss == pytest.approx(1.7054937, rel=1e-5) and grad == pytest.approx(0.7912444, rel=1e-5)


def test_sapo_gate_is_smooth_where_ppo_is_hard():
    # rho = 1.5 is past PPO's 0.2 clip for A > 0 (gradient 0); SAPO still passes a damped gradient
    _, ppo_grad = token(0.75, 0.5, 1.0, "ppo_clip")
    _, sapo_grad = token(0.75, 0.5, 1.0, "sapo")
    assert ppo_grad == 0.0 and sapo_grad < 0.0
    # and it decays with the distance from 1: rho = 3 weighs less than rho = 1.5, rho = 10 almost nothing
    assert abs(token(0.9, 0.3, 1.0, "sapo")[1]) < abs(sapo_grad)
    assert abs(token(0.95, 0.095, 1.0, "sapo")[1]) == pytest.approx(40 * math.exp(-9) / (1 + math.exp(-9)) ** 2, rel=1e-3)


def test_sapo_rejects_a_non_positive_temperature():
    with pytest.raises(ValueError, match="tau_pos"):
        token(0.5, 0.5, 1.0, "sapo", tau_pos=0.0)


# -- VESPO (TRL docs: L = -phi(W) A log pi, phi(W) = W^k exp(lambda (1 - W)) detached, W the sequence ratio) ----


def test_vespo_matches_the_trl_docs_kernel_by_hand():
    # two tokens with log-ratios 0.1 and 0.2: W = e^0.3 (the product, not a geometric mean)
    old = [[math.log(0.5), math.log(0.4)]]
    new = [[math.log(0.5) + 0.1, math.log(0.4) + 0.2]]
    batch, leaf = make_batch(new, old, [1.0])
    loss, _ = run("vespo", batch, leaf)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    phi = 0.6378983  # e^0.6 * exp(3 (1 - e^0.3)), k_pos = 2, lambda_pos = 3
    assert torch.allclose(grad, torch.full((1, 2), -phi), rtol=1e-5)
    assert torch.allclose(loss.detach(), -phi * leaf.detach(), rtol=1e-5)
    batch, leaf = make_batch(new, old, [-1.0])  # k_neg = 3, lambda_neg = 2
    loss, _ = run("vespo", batch, leaf)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert torch.allclose(grad, torch.full((1, 2), 1.2217477), rtol=1e-5)


def test_vespo_uses_the_true_product_ratio():
    # the same per-token log-ratio over twice the tokens doubles log W: the kernel differs (GSPO's mean would not)
    one, leaf1 = make_batch([[0.1 - 1.0]], [[-1.0]], [1.0])
    two, leaf2 = make_batch([[0.1 - 1.0, 0.1 - 1.0]], [[-1.0, -1.0]], [1.0])
    g1 = torch.autograd.grad(run("vespo", one, leaf1)[0].sum(), leaf1)[0][0, 0]
    g2 = torch.autograd.grad(run("vespo", two, leaf2)[0].sum(), leaf2)[0][0, 0]
    w1, w2 = math.exp(0.1), math.exp(0.2)
    assert float(g1) == pytest.approx(-(w1**2) * math.exp(3 * (1 - w1)), rel=1e-5)
    assert float(g2) == pytest.approx(-(w2**2) * math.exp(3 * (1 - w2)), rel=1e-5)


# -- GMPO (verl geo_mean: exp(mean_t sgn(A) min(sgn(A) x, sgn(A) clip(x))), loss -A * ratio) -----------------


def test_gmpo_matches_verls_geometric_mean_by_hand():
    # log-ratios [0.5, 0.1], eps 0.4: A > 0 clips 0.5 -> 0.4, s = e^0.25; the clipped token gets no gradient
    batch, leaf = make_batch([[-0.5, -0.9]], [[-1.0, -1.0]], [1.0])
    total, grad, _ = aggregated("gmpo", batch, leaf, "seq-mean-token-mean")
    assert total == pytest.approx(-1.2840254, rel=1e-5)
    assert grad[0, 0] == 0.0 and float(grad[0, 1]) == pytest.approx(-0.6420127, rel=1e-5)
    # A < 0 clips only from below: nothing clipped here, s = e^0.3, both tokens +s/2
    batch, leaf = make_batch([[-0.5, -0.9]], [[-1.0, -1.0]], [-1.0])
    total, grad, _ = aggregated("gmpo", batch, leaf, "seq-mean-token-mean")
    assert total == pytest.approx(1.3498588, rel=1e-5)
    assert torch.allclose(grad, torch.full((1, 2), 0.6749294), rtol=1e-5)


def test_gmpo_and_luspo_declare_their_aggregation():
    with pytest.raises(Exception, match="gmpo"):
        build_components(load_recipe("gmpo", {"algorithm.aggregate": {"name": "token-mean"}}))
    with pytest.raises(Exception, match="luspo"):
        build_components(load_recipe("luspo", {"algorithm.aggregate": {"name": "seq-mean-token-mean"}}))


# -- LUSPO (TRL: loss = (per_token_loss * L_i).mean() over sequences, GSPO's sequence ratio) -------------------


def test_luspo_weights_each_sequence_by_its_length():
    # on-policy, A = 1 for both rows of lengths 1 and 3: GSPO's loss per row is -1, LUSPO's -L_i (mean -2);
    # every token gets the same gradient -1/N_seq, where GSPO gives the long row's tokens a third of it
    logp = [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]
    mask = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    batch, leaf = make_batch(logp, logp, [1.0, 1.0], mask)
    total, grad, _ = aggregated("luspo", batch, leaf, "seq-mean-token-sum")
    assert total == pytest.approx(-2.0)
    assert torch.allclose(grad, -0.5 * torch.tensor(mask))
    batch, leaf = make_batch(logp, logp, [1.0, 1.0], mask)
    _, gspo_grad, _ = aggregated("gspo", batch, leaf, "seq-mean-token-mean")
    assert float(gspo_grad[1, 0]) == pytest.approx(-0.5 / 3)


# -- GPG: the loss is the plain policy gradient -------------------------------------------------------------


def test_gpg_loss_is_minus_advantage_times_logp_even_off_policy():
    loss, grad = token(0.9, 0.3, 2.0, "gpg")  # a ratio of 3 changes nothing: no ratio, no clip
    assert loss == pytest.approx(-2.0 * math.log(0.9), rel=1e-6) and grad == pytest.approx(-2.0)


# -- DPPO (verl dppo_tv / dppo_kl; prime-rl: min(pi/mu, delta) A + kl_tau log^2(pi/mu)) ---------------------


@pytest.mark.parametrize("p_new, adv, kept", [
    (0.8, 1.0, False),   # p rose by 0.3 > 0.2 in the direction A pushes: masked
    (0.8, -1.0, True),   # same move against a negative advantage's push: kept
    (0.6, 1.0, True),    # inside the bound
    (0.2, -1.0, False),  # fell by 0.3 with A < 0 pushing down: masked
    (0.2, 1.0, True),
])
def test_dppo_tv_mask_by_hand(p_new, adv, kept):
    loss, grad = token(p_new, 0.5, adv, "dppo_tv")
    ratio = p_new / 0.5
    assert grad == pytest.approx(-adv * ratio if kept else 0.0, rel=1e-5)
    assert loss == pytest.approx(-adv * ratio if kept else 0.0, rel=1e-5)  # prime-rl's value -min(rho, C) A


def test_dppo_kl_mask_by_hand():
    # KL(Bern(0.5) || Bern(0.8)) = 0.22314 > 0.05: masked for A > 0 (p went up); kept for A < 0 (it moved against)
    assert token(0.8, 0.5, 1.0, "dppo_kl")[1] == 0.0
    assert token(0.8, 0.5, -1.0, "dppo_kl")[1] == pytest.approx(1.6, rel=1e-5)
    # KL(Bern(0.5) || Bern(0.55)) = 0.00503 < 0.05: kept
    assert token(0.55, 0.5, 1.0, "dppo_kl")[1] == pytest.approx(-1.1, rel=1e-5)
    from policylab.algo.objectives.trust_region_masks import binary_kl

    assert float(binary_kl(torch.tensor(0.8), torch.tensor(0.5))) == pytest.approx(0.2231436, rel=1e-5)


def test_dppo_truncates_the_importance_weight_and_adds_prime_rls_kl():
    # rho = 1.2 > C = 1.1: weight C, the gradient still flows (truncated IS, not a mask)
    loss, grad = token(0.6, 0.5, 1.0, "dppo_tv", ratio_cap=1.1)
    assert loss == pytest.approx(-1.1, rel=1e-5) and grad == pytest.approx(-1.1, rel=1e-5)
    # kl_coef * (log rho)^2: value and gradient 2 kl_coef log rho on top
    loss, grad = token(0.6, 0.5, 1.0, "dppo_tv", kl_coef=0.5)
    lr = math.log(1.2)
    assert loss == pytest.approx(-1.2 + 0.5 * lr**2, rel=1e-5) and grad == pytest.approx(-1.2 + lr, rel=1e-5)


# -- Clip-Cov and KL-Cov --------------------------------------------------------------------------------------


def covariance_batch(logp, adv, old=None):
    batch, leaf = make_batch(logp, logp if old is None else old, adv)
    return batch, leaf


def test_clip_cov_detaches_one_token_inside_the_covariance_band():
    # means: logp -1.05, A 0 -> c = +1.9 at (0,0) and (1,1), -1.9 elsewhere; ratio 0.25 of 4 tokens = 1 token
    logp = [[-0.1, -2.0], [-0.1, -2.0]]
    batch, leaf = covariance_batch(logp, [2.0, -2.0])
    loss, metrics = run("clip_cov", batch, leaf, ratio=0.25)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    reinforce = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    detached = (grad == 0)
    assert int(detached.sum()) == 1 and bool(detached[0, 0] or detached[1, 1])
    assert torch.equal(grad[~detached], reinforce[~detached])
    assert float(metrics["clip_cov/detached_frac"]) == pytest.approx(0.25)
    # a band that excludes 1.9: nothing detached, plain PPO-clip (= REINFORCE on-policy)
    batch, leaf = covariance_batch(logp, [2.0, -2.0])
    loss, _ = run("clip_cov", batch, leaf, ratio=0.25, omega_high=1.85)
    assert torch.equal(torch.autograd.grad(loss.sum(), leaf)[0], reinforce)


def test_kl_cov_penalises_the_top_covariance_token_by_hand():
    # logp [[-0.1, -2.0], [-0.3, -2.0]], A [2, -2]: c(0,0) = 1.0 * 2 = 2.0 is the largest; off-policy log-ratio 0.2 there
    logp = [[-0.1, -2.0], [-0.3, -2.0]]
    old = [[-0.3, -2.0], [-0.3, -2.0]]
    batch, leaf = covariance_batch(logp, [2.0, -2.0], old)
    loss, _ = run("kl_cov", batch, leaf, ratio=0.25)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert float(grad[0, 0]) == pytest.approx(-2 * math.exp(0.2) + 1.0, rel=1e-5)  # -A rho + |log rho|'
    assert float(loss[0, 0].detach()) == pytest.approx(-2 * math.exp(0.2) + 0.2, rel=1e-5)
    assert torch.allclose(grad[1], torch.tensor([2.0, 2.0]))


def test_kl_cov_on_policy_zero_advantage_gives_zero_gradient():
    # its skip:T-ZEROADV is for the off-policy penalty only: on-policy the penalty's gradient is 0
    batch, leaf = covariance_batch([[-0.1, -2.0], [-0.3, -2.0]], [0.0, 2.0])
    loss, _ = run("kl_cov", batch, leaf, ratio=0.5)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert torch.all(grad[0] == 0) and torch.all(grad[1] == -2.0)
