"""R²VPO, GBPO/BPO and MDPO (policylab/algo/objectives/penalised.py): the spec's numbers and property tests."""

from __future__ import annotations

import math
from types import SimpleNamespace
import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import dr_grpo_advantage, grpo_advantage
from policylab.algo.objectives.penalised import (
    exact_token_kl,
    gbpo_target_ratio,
    mdpo_step_size,
    r2vpo_dual_update,
    r2vpo_token_loss,
    sampled_token_kl,
)
from policylab.rollouts import PolicyOutputs
from test_objectives_ratio_common import aggregate, annotated, grad_of, log_of, make_batch


def run(name, batch, leaf, **params):
    return registry.build("objective", name, params)(PolicyOutputs(logp=leaf), batch)


# ---------------------------------------------------------------------------------------------------
# R²VPO


def test_r2vpo_numbers():
    rho = torch.tensor([[1.1, 0.9]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss = r2vpo_token_loss(rho, adv, 0.5).mean()
    assert float(loss.detach()) == pytest.approx(-0.095, abs=1e-6)
    assert torch.allclose(grad_of(loss, rho), torch.tensor([[-0.45, 0.45]]), atol=1e-6)
    # the same through the component: d/d logp = d/d rho * rho
    batch, leaf = make_batch([[0.0, 0.0]], log_of([[1.1, 0.9]]), [[1.0, -1.0]])
    out, _ = run("r2vpo", batch, leaf, lambda_init=0.5)
    total = aggregate(out, batch)
    assert float(total.detach()) == pytest.approx(-0.095, abs=1e-6)
    assert torch.allclose(grad_of(total, leaf), torch.tensor([[-0.45 * 1.1, 0.45 * 0.9]]), atol=1e-6)


def test_r2vpo_lambda_zero_is_the_unclipped_surrogate():
    batch, leaf = make_batch([[0.0, 0.0]], log_of([[1.6, 0.3]]), [2.0])
    loss, _ = run("r2vpo", batch, leaf, lambda_init=0.0)
    assert torch.allclose(loss, -2.0 * torch.tensor([[1.6, 0.3]]), atol=1e-6)


def test_r2vpo_toy_optimum_is_one_plus_a_over_two_lambda():
    z = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([z], lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        r2vpo_token_loss(torch.exp(z), torch.tensor(1.0), 0.5).backward()
        opt.step()
    assert float(torch.exp(z.detach())) == pytest.approx(2.0, abs=1e-4)


def test_r2vpo_dual_step_numbers_and_accumulation_over_micro_batches():
    assert r2vpo_dual_update(1.0, 0.02, delta=0.01, eta=0.1, lam_max=100) == pytest.approx(1.001)
    assert r2vpo_dual_update(0.0, 0.005, delta=0.01, eta=0.1, lam_max=100) == 0.0
    assert r2vpo_dual_update(99.99, 10.0, delta=0.01, eta=0.1, lam_max=100) == 100.0
    objective = registry.build("objective", "r2vpo", {"lambda_init": 1.0, "delta": 0.01, "eta_lambda": 0.1})
    step = math.sqrt(0.02)  # (rho-1)^2 = 0.02 on every token -> V = 0.02
    for ratio in (1 + step, 1 - step):  # two micro-batches of one optimizer step
        batch, leaf = make_batch([[0.0]], log_of([[ratio]]), [1.0])
        objective(PolicyOutputs(logp=leaf), batch)
    objective.after_step({})
    assert objective.lam == pytest.approx(1.001, abs=1e-9)
    objective.after_step({})  # nothing accumulated since: unchanged
    assert objective.lam == pytest.approx(1.001, abs=1e-9)
    fresh = registry.build("objective", "r2vpo")
    fresh.load_state_dict(objective.state_dict())
    assert fresh.lam == objective.lam


# ---------------------------------------------------------------------------------------------------
# GBPO / BPO


def gbpo_batch(rewards, ratio=1.0, length=2):
    b = len(rewards)
    batch, leaf = make_batch([[0.0] * length] * b, log_of([[ratio] * length] * b), None, rewards=rewards)
    batch.advantages = grpo_advantage(batch)
    return batch, leaf


def test_gbpo_rewards_1110_numbers():
    batch, leaf = gbpo_batch([1.0, 1.0, 1.0, 0.0])
    tau = gbpo_target_ratio(batch.rewards, batch.group, eps_low=0.2, eps_high=0.2, temperature=1e-4)
    assert torch.allclose(tau, torch.tensor([1.0, 1.0, 1.0, 0.8]), atol=1e-6)
    assert torch.allclose(batch.advantages, torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5)
    loss, _ = run("gbpo", batch, leaf)
    total = aggregate(loss, batch)
    assert float(total.detach()) == pytest.approx(0.075, abs=1e-5)
    g = grad_of(total, leaf)
    assert torch.all(g[:3] == 0)
    assert torch.all(g[3] > 0)  # descent lowers the incorrect sample's ratio toward 0.8


def test_gbpo_rewards_1010_targets_and_exact_fit():
    tau = gbpo_target_ratio(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.long), eps_low=0.2,
                            eps_high=0.2, temperature=1e-4)
    assert torch.allclose(tau, torch.tensor([1.2, 0.8, 1.2, 0.8]), atol=1e-6)
    batch, leaf = make_batch([[0.0]] * 2, log_of([[1.2], [0.8]]), None, rewards=[1.0, 0.0])
    batch.advantages = grpo_advantage(batch)
    loss, _ = run("gbpo", batch, leaf)
    assert float(loss.detach().abs().max()) < 1e-5  # rho == tau -> loss 0


def test_gbpo_medians_are_per_group_and_failed_rows_stay_put():
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    tau = gbpo_target_ratio(rewards, group, eps_low=0.2, eps_high=0.3, temperature=1e-4)
    # group 0 (valid 1, 0): median 0.5; group 1 (0, 0, 1): median 0, so its zeros sit at the median:
    # tau = 1 - eps_low + (eps_low + eps_high)/2 = 1.05 with these asymmetric bounds
    assert torch.allclose(tau, torch.tensor([1.3, 0.8, 1.0, 1.05, 1.05, 1.3]), atol=1e-6)


def test_bpo_parameterisation_uses_a_soft_target_without_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    tau = gbpo_target_ratio(rewards, torch.zeros(4, dtype=torch.long), eps_low=0.2, eps_high=0.2, temperature=1.0,
                            norm_by_std=False)
    expected_top = 0.8 + 0.4 / (1 + math.exp(-1.0))
    assert torch.allclose(tau, torch.tensor([expected_top, 1.0, 1.0, 1.0]), atol=1e-6)
    batch, leaf = make_batch([[0.0]] * 4, [[0.0]] * 4, None, rewards=rewards.tolist())
    batch.advantages = dr_grpo_advantage(batch)
    loss, _ = run("gbpo", batch, leaf, temperature=1.0, norm_by_std=False)
    assert float(loss[0, 0].detach()) == pytest.approx((expected_top - 1) * 0.75, abs=1e-6)


def test_gbpo_annotate_provides_the_whole_batch_target():
    batch, leaf = gbpo_batch([1.0, 1.0, 1.0, 0.0])
    objective = registry.build("objective", "gbpo")
    prepared = annotated(objective, batch)
    assert torch.allclose(prepared.extras["gbpo_target_ratio"], torch.tensor([1.0, 1.0, 1.0, 0.8]), atol=1e-6)
    alone = prepared.select([3])  # a micro-batch of one row still sees its group's target
    loss, _ = objective(PolicyOutputs(logp=leaf[3:]), alone)
    full, _ = objective(PolicyOutputs(logp=leaf), batch)
    assert torch.allclose(loss, full[3:])


def test_gbpo_needs_rewards():
    batch, leaf = make_batch([[0.0]], [[0.0]], [1.0])
    with pytest.raises(ValueError, match="rewards"):
        run("gbpo", batch, leaf)
    with pytest.raises(ValueError, match="temperature"):
        registry.build("objective", "gbpo", {"temperature": 0.0})


# ---------------------------------------------------------------------------------------------------
# MDPO


def test_mdpo_exact_kl_numbers():
    p_theta, p_old = torch.tensor([0.6, 0.4]), torch.tensor([0.5, 0.5])
    kl = exact_token_kl(p_theta.log(), p_old.log())
    assert float(kl) == pytest.approx(0.020136, abs=1e-6)
    rho, adv, t_k = 0.6 / 0.5, 1.0, 0.5
    assert -rho * adv + float(kl) / t_k == pytest.approx(-1.159729, abs=1e-6)


def test_mdpo_sampled_estimator_averages_to_the_exact_kl():
    # the two possible tokens, weighted by the frozen iterate's probabilities, with A = 0
    batch, leaf = make_batch([[math.log(0.6)], [math.log(0.4)]], [[math.log(0.5)], [math.log(0.5)]], [0.0, 0.0])
    objective = registry.build("objective", "mdpo", {"total_iterations": 4})
    objective.iteration = 3  # t_k = 1 - 2/4 = 0.5
    loss, metrics = objective(PolicyOutputs(logp=leaf), batch)
    expectation = 0.5 * loss[0, 0] + 0.5 * loss[1, 0]
    assert float(expectation.detach()) == pytest.approx(2 * 0.020136, abs=1e-6)
    assert float(metrics["mdpo/step_size"]) == 0.5


def test_mdpo_schedule_and_sampled_kl_is_nonnegative():
    assert mdpo_step_size(1, 10) == 1.0
    assert mdpo_step_size(10, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mdpo_step_size(11, 10)
    d = torch.linspace(-20, 20, 401)
    assert torch.all(sampled_token_kl(d) >= 0)
    assert float(sampled_token_kl(torch.zeros(1))) == 0.0


def test_mdpo_after_step_counts_rollout_batches_against_the_run_length():
    objective = registry.build("objective", "mdpo")
    batch, _ = make_batch([[0.0]], [[0.0]], [1.0])
    annotated(objective, batch, SimpleNamespace(total_steps=10))  # K = the run's train.steps; provides nothing
    assert objective.total_iterations == 10
    assert objective.step_size == 1.0  # the first batch trains at k = 1
    for _ in range(4):
        objective.after_step({})
    assert objective.step_size == pytest.approx(0.6)  # k = 5: 1 - 4/10
    restored = registry.build("objective", "mdpo")
    restored.load_state_dict(objective.state_dict())
    restored.after_step({})
    assert restored.step_size == pytest.approx(0.5)  # resumed, then k = 6
    for _ in range(40):
        objective.after_step({})
    assert objective.step_size == pytest.approx(0.1)  # past K it stays at 1/K
    assert not hasattr(objective, "prepare")
    fixed = registry.build("objective", "mdpo", {"total_iterations": 4})
    annotated(fixed, batch, SimpleNamespace(total_steps=10))
    assert fixed.total_iterations == 4  # the recipe's horizon wins


def test_mdpo_first_inner_step_is_reinforce_and_later_steps_are_pulled_back():
    batch, leaf = make_batch([[0.0, 0.0]], [[0.0, 0.0]], [[1.0, -1.0]])
    objective = registry.build("objective", "mdpo", {"total_iterations": 2})
    objective.iteration = 2  # t = 0.5
    g = grad_of(objective(PolicyOutputs(logp=leaf), batch)[0].sum(), leaf)
    assert torch.allclose(g, torch.tensor([[-1.0, 1.0]]))
    moved, leaf = make_batch([[0.3, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]])
    g = grad_of(objective(PolicyOutputs(logp=leaf), moved)[0].sum(), leaf)
    # d/d logp (rho log rho - rho + 1)/t = rho*log(rho)/t
    assert float(g[0, 0]) == pytest.approx(math.exp(0.3) * 0.3 / 0.5, rel=1e-5)
