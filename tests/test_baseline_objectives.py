"""Hand-computed numbers of the baseline objectives of policylab/algo/objectives/policy_gradient.py (objectives.md
§1.1 PPO-clip / dual clip, §1.3 clip-higher, §1.4 GSPO, §1.5 CISPO) and their metrics. The shared properties
(T-ONPOL etc.) are in test_objective_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import logp_batch as make_batch, make_rollouts




def run(name, batch, leaf, **params):
    return registry.build("objective", name, params)(PolicyOutputs(logp=leaf), batch)


def token(p_new, p_old, adv, name="ppo_clip", **params):
    """(per-token loss, d loss / d logp) for a single token."""
    batch, leaf = make_batch([[math.log(p_new)]], [[math.log(p_old)]], [adv])
    loss, metrics = run(name, batch, leaf, **params)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return float(loss[0, 0].detach()), float(grad[0, 0]), metrics


def aggregated_grad(name, batch, leaf, mode, max_len=8.0, **params):
    loss, metrics = run(name, batch, leaf, **params)
    mask = batch.completion_mask
    total = registry.build("aggregate", mode)(loss * mask, mask, Normaliser.of(mask, max_len))
    (grad,) = torch.autograd.grad(total, leaf)
    return total.detach(), grad, metrics


# ---------------------------------------------------------------------------------------------------
# §1.1 PPO-clip and dual clip


def test_ppo_clip_positive_advantage_above_the_range_is_clipped_with_zero_gradient():
    loss, grad, _ = token(0.7, 0.5, +1.0, eps_low=0.2, eps_high=0.2)  # rho = 1.4
    assert loss == pytest.approx(-1.2, abs=1e-5)
    assert grad == 0.0


def test_ppo_clip_negative_advantage_above_the_range_keeps_its_gradient():
    loss, grad, _ = token(0.7, 0.5, -1.0, eps_low=0.2, eps_high=0.2)
    assert loss == pytest.approx(1.4, abs=1e-5)
    assert grad == pytest.approx(1.4, abs=1e-5)


def test_ppo_clip_below_the_range():
    # A>0, rho=0.5: the pessimistic min keeps the unclipped term -> gradient -rho
    loss, grad, _ = token(0.25, 0.5, +1.0)
    assert (loss, grad) == (pytest.approx(-0.5, abs=1e-5), pytest.approx(-0.5, abs=1e-5))
    # A<0, rho=0.5: clipped at 1-eps = 0.8 -> zero gradient
    loss, grad, _ = token(0.25, 0.5, -1.0)
    assert (loss, grad) == (pytest.approx(0.8, abs=1e-5), 0.0)


def test_dual_clip_caps_a_negative_advantage_at_c():
    loss, grad, metrics = token(0.8, 0.2, -1.0, dual_clip_c=3.0)  # rho = 4
    assert loss == pytest.approx(3.0, abs=1e-5)
    assert grad == 0.0
    assert float(metrics["clipfrac/dual"]) == 1.0
    loss, grad, metrics = token(0.8, 0.2, -1.0, dual_clip_c=None)
    assert loss == pytest.approx(4.0, abs=1e-5)
    assert grad == pytest.approx(4.0, abs=1e-5)
    assert float(metrics["clipfrac/dual"]) == 0.0


def test_dual_clip_leaves_positive_advantages_and_ratios_below_c_alone():
    assert token(0.8, 0.2, +1.0, dual_clip_c=3.0)[:2] == (pytest.approx(-1.2, abs=1e-5), 0.0)
    loss, grad, _ = token(0.8, 0.4, -1.0, dual_clip_c=3.0)  # rho = 2 < c
    assert (loss, grad) == (pytest.approx(2.0, abs=1e-5), pytest.approx(2.0, abs=1e-5))


def test_library_default_is_no_dual_clip():
    assert token(0.8, 0.2, -1.0)[:2] == (pytest.approx(4.0, abs=1e-5), pytest.approx(4.0, abs=1e-5))


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_c_must_exceed_one(c):
    with pytest.raises(ValueError, match="dual_clip_c"):
        token(0.8, 0.2, -1.0, dual_clip_c=c)


def test_ppo_clip_metrics():
    # rows: (rho 1.4, A+1) clipped high; (rho 0.5, A-1) clipped low; (rho 1, A+1) free; (rho 4, A-1) dual-clipped.
    # The second position of every row is padding with a ratio far outside the range: it must not count.
    new = [[math.log(0.7), 0.0], [math.log(0.25), 0.0], [math.log(0.5), 0.0], [math.log(0.8), 0.0]]
    old = [[math.log(0.5), -5.0], [math.log(0.5), -5.0], [math.log(0.5), -5.0], [math.log(0.2), -5.0]]
    mask = [[1, 0], [1, 0], [1, 0], [1, 0]]
    batch, leaf = make_batch(new, old, [1.0, -1.0, 1.0, -1.0], mask)
    _, metrics = run("ppo_clip", batch, leaf, dual_clip_c=3.0)
    assert float(metrics["clipfrac"]) == pytest.approx(0.5)
    assert float(metrics["clipfrac/high"]) == pytest.approx(0.25)
    assert float(metrics["clipfrac/low"]) == pytest.approx(0.25)
    assert float(metrics["clipfrac/dual"]) == pytest.approx(0.25)
    rhos = [1.4, 0.5, 1.0, 4.0]
    assert float(metrics["ratio/max"]) == pytest.approx(4.0, abs=1e-5)
    assert float(metrics["ratio/min"]) == pytest.approx(0.5, abs=1e-5)
    assert float(metrics["ratio/mean"]) == pytest.approx(sum(rhos) / 4, abs=1e-5)
    # ppo_kl = mean(old_logp - logp), the k1 estimate of KL(old || new)
    assert float(metrics["ppo_kl"]) == pytest.approx(-sum(math.log(r) for r in rhos) / 4, abs=1e-5)


def test_ppo_clip_per_token_advantages_on_policy():
    logp = torch.log(torch.tensor([[0.3, 0.6, 0.9], [0.5, 0.5, 0.2]]))
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    batch, leaf = make_batch(logp, logp, adv, mask)
    _, grad, _ = aggregated_grad("ppo_clip", batch, leaf, "token-mean")
    assert torch.allclose(grad, -adv * mask / 5, atol=1e-6)


def test_ppo_clip_extreme_log_ratio_stays_finite():
    # log-ratio 30 is clamped to 20 before exp (objectives.md §0)
    loss, grad, _ = token(1.0, math.exp(-30.0), -1.0)
    assert math.isfinite(loss) and loss == pytest.approx(math.exp(20.0), rel=1e-5)
    assert grad == 0.0  # the clamp is flat beyond 20


# ---------------------------------------------------------------------------------------------------
# §1.3 DAPO clip-higher (asymmetric bounds) with token-mean


def test_clip_higher_rho_125_positive_advantage():
    n = 4
    new = torch.full((1, n), math.log(0.625))
    old = torch.full((1, n), math.log(0.5))  # rho = 1.25 on every token
    batch, leaf = make_batch(new, old, [1.0])
    _, grad, _ = aggregated_grad("ppo_clip", batch, leaf, "token-mean", eps_low=0.2, eps_high=0.28)
    assert torch.allclose(grad, torch.full((1, n), -1.25 / n), atol=1e-6)
    batch, leaf = make_batch(new, old, [1.0])
    _, grad, _ = aggregated_grad("ppo_clip", batch, leaf, "token-mean", eps_low=0.2, eps_high=0.2)
    assert torch.all(grad == 0)


def test_clip_higher_rho_075_negative_advantage_uses_eps_low():
    loss, grad, _ = token(0.375, 0.5, -1.0, eps_low=0.2, eps_high=0.28)  # rho = 0.75 < 0.8
    assert (loss, grad) == (pytest.approx(0.8, abs=1e-5), 0.0)
    loss, grad, _ = token(0.375, 0.5, -1.0, eps_low=0.3, eps_high=0.28)  # 0.75 > 0.7: inside
    assert (loss, grad) == (pytest.approx(0.75, abs=1e-5), pytest.approx(0.75, abs=1e-5))


# ---------------------------------------------------------------------------------------------------
# §1.4 GSPO


def gspo_batch(log_ratios, adv, old=-1.0):
    d = torch.tensor([log_ratios])
    return make_batch(old + d, torch.full_like(d, old), [adv])


def test_gspo_spec_numbers_clipped():
    batch, leaf = gspo_batch([0.1, -0.3, 0.5], +1.0)  # s = exp(mean) = exp(0.1) = 1.105171
    loss, grad, metrics = aggregated_grad("gspo", batch, leaf, "seq-mean-token-mean")
    assert float(loss) == pytest.approx(-1.0004, abs=1e-6)
    assert torch.all(grad == 0)
    assert float(metrics["clipfrac"]) == 1.0
    assert float(metrics["gspo/abs_log_s"]) == pytest.approx(0.1, abs=1e-6)


def test_gspo_spec_numbers_unclipped_negative_advantage():
    batch, leaf = gspo_batch([0.1, -0.3, 0.5], -1.0)  # A<0, s above the range: max keeps -A*s
    loss, grad, metrics = aggregated_grad("gspo", batch, leaf, "seq-mean-token-mean")
    s = math.exp(0.1)
    assert s == pytest.approx(1.105171, abs=1e-6)
    assert float(loss) == pytest.approx(s, abs=1e-5)
    assert torch.allclose(grad, torch.full((1, 3), s / 3), atol=1e-6)  # s*A*(1/L) on every token
    assert float(metrics["clipfrac"]) == 0.0


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_gspo_is_invariant_to_permuting_token_ratios(adv):
    """A token-ratio implementation gives each token its own rho_t and fails: its gradient gets permuted."""
    wide = {"eps_low": 0.5, "eps_high": 0.5}
    results = []
    for order in ([0.1, -0.3, 0.5], [0.5, 0.1, -0.3], [-0.3, 0.5, 0.1]):
        batch, leaf = gspo_batch(order, adv)
        loss, grad, _ = aggregated_grad("gspo", batch, leaf, "seq-mean-token-mean", **wide)
        results.append((float(loss), grad))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6)
        assert torch.allclose(grad, results[0][1], atol=1e-6)
    expected = -adv * math.exp(0.1) / 3
    assert torch.allclose(results[0][1], torch.full((1, 3), expected), atol=1e-6)


def test_gspo_equals_the_sequence_objective():
    """§1.4: J = (1/N_seq) sum_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean_t d) differentiated directly."""
    gen = torch.Generator().manual_seed(3)
    b, t = 5, 4
    old = torch.log(torch.rand(b, t, generator=gen) * 0.8 + 0.1)
    # per-sequence offsets put sequences inside and on both sides of the range
    offsets = torch.tensor([[0.0], [2e-4], [1e-3], [-1e-3], [-1e-4]])  # rows 2, 3 clipped (A>0 above, A<0 below)
    new = old + offsets + 1e-4 * torch.randn(b, t, generator=gen)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, -0.5, 1.5, -1.0, 0.7])
    eps_low, eps_high = 3e-4, 4e-4
    batch, leaf = make_batch(new, old, adv, mask)
    loss, grad, _ = aggregated_grad("gspo", batch, leaf, "seq-mean-token-mean", eps_low=eps_low, eps_high=eps_high)

    ref_leaf = new.clone().double().requires_grad_(True)
    lengths = mask.sum(-1).double()
    s = torch.exp(((ref_leaf - old.double()) * mask).sum(-1) / lengths)
    a = adv.double()
    j = torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a).mean()
    (ref_grad,) = torch.autograd.grad(-j, ref_leaf)
    assert float(loss.detach()) == pytest.approx(float(-j.detach()), abs=1e-5)
    assert torch.allclose(grad.double(), ref_grad * mask, atol=1e-6)
    assert (grad != 0).any() and (grad[mask > 0] == 0).any()  # both branches exercised


def test_gspo_token_uses_per_token_advantages():
    """GSPO-token: grad logp_t = -A_t * s_i / (N_seq * L_i)."""
    d = torch.tensor([[0.1, -0.3, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    adv = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    batch, leaf = make_batch(-1.0 + d, torch.full_like(d, -1.0), adv, mask)
    _, grad, _ = aggregated_grad("gspo_token", batch, leaf, "seq-mean-token-mean", eps_low=0.5, eps_high=0.5)
    assert torch.allclose(grad, -adv * math.exp(0.1) / 3 * mask, atol=1e-6)


def test_gspo_log_ratio_is_clamped_at_10():
    batch, leaf = gspo_batch([15.0, 15.0], -1.0, old=-16.0)
    loss, _ = run("gspo", batch, leaf)
    assert torch.allclose(loss, torch.full((1, 2), math.exp(10.0)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# §1.5 CISPO


def test_cispo_rho_15_is_capped_but_keeps_its_gradient():
    p_old = 0.4
    loss, grad, metrics = token(0.6, p_old, +1.0, name="cispo", eps_low=0.2, eps_high=0.28)  # rho = 1.5
    assert loss == pytest.approx(-1.28 * math.log(0.6), abs=1e-5)
    assert grad == pytest.approx(-1.28, abs=1e-5)
    assert float(metrics["clipfrac"]) == 1.0
    assert float(metrics["cispo/weight_mean"]) == pytest.approx(1.28, abs=1e-5)
    assert token(0.6, p_old, +1.0, name="ppo_clip", eps_low=0.2, eps_high=0.28)[1] == 0.0  # PPO-clip: zero


def test_cispo_weight_is_detached():
    """d/dlogp of -w*A*logp must be -w*A, not -(w + logp*dw/dlogp)*A (rho = 1.1 inside the range)."""
    loss, grad, metrics = token(0.55, 0.5, +1.0, name="cispo", eps_low=0.2, eps_high=0.28)
    assert grad == pytest.approx(-1.1, abs=1e-5)
    assert loss == pytest.approx(-1.1 * math.log(0.55), abs=1e-5)
    assert float(metrics["clipfrac"]) == 0.0


def test_cispo_defaults_cap_at_5_and_have_no_lower_bound():
    assert token(0.6, 0.1, +1.0, name="cispo")[1] == pytest.approx(-5.0, abs=1e-5)  # rho = 6 -> w = 5
    assert token(0.05, 0.5, -1.0, name="cispo")[1] == pytest.approx(0.1, abs=1e-5)  # rho = 0.1 kept
    assert token(0.05, 0.5, +1.0, name="cispo")[1] == pytest.approx(-0.1, abs=1e-5)  # never zeroed


def test_cispo_negative_advantage_gradient_sign():
    # A<0 pushes logp down: loss gradient is +w*|A|
    assert token(0.6, 0.4, -2.0, name="cispo", eps_low=0.2, eps_high=0.28)[1] == pytest.approx(2 * 1.28, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# reinforce reference


def test_reinforce_is_minus_advantage_times_logp():
    batch, leaf = make_batch([[math.log(0.5), math.log(0.25)]], [[0.0, 0.0]], [2.0], [[1, 0]])
    loss, metrics = run("reinforce", batch, leaf)
    assert loss[0, 0].item() == pytest.approx(-2.0 * math.log(0.5), abs=1e-6)
    assert loss[0, 1].item() == 0.0  # masked position carries no advantage
