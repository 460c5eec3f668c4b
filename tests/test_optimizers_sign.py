"""Lion / Lion-kappa (objectives.md §5.1) and StoSignSGD (§5.2): policylab.algo.optimizers.sign."""

from __future__ import annotations

import pytest
import torch

from policylab import registry
from policylab.algo.optimizers.sign import Lion, StoSignSGD


def one_step(opt_cls, x, g, **kw):
    p = torch.nn.Parameter(torch.tensor(x))
    opt = opt_cls([p], **kw)
    p.grad = torch.tensor(g)
    opt.step()
    return p.detach(), opt.state[p]


def test_lion_one_step_numbers():
    x, state = one_step(Lion, [1.0, 1.0], [0.5, -2.0], lr=0.1, weight_decay=0.1)
    assert torch.allclose(x, torch.tensor([0.89, 1.09]))
    assert torch.allclose(state["exp_avg"], torch.tensor([0.005, -0.02]))


def test_lion_interpolates_with_the_old_momentum_and_updates_it_after_the_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = Lion([p], lr=1.0, betas=(0.9, 0.5))
    p.grad = torch.tensor([1.0])
    opt.step()  # c = 0.1 -> x = -1; m = 0.5
    p.grad = torch.tensor([-2.0])
    opt.step()  # c = 0.9*0.5 - 0.2 = 0.25 -> x = -2 (with the new m, -0.75, c would be negative)
    assert float(p.detach()) == pytest.approx(-2.0)
    assert float(opt.state[p]["exp_avg"]) == pytest.approx(0.5 * 0.5 + 0.5 * -2.0)


def test_lion_box_fixed_point():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = Lion([p], lr=0.01, weight_decay=0.5)
    a = torch.tensor([1.0, -2.0])
    for _ in range(20_000):
        p.grad = -a
        opt.step()
    assert torch.allclose(p.detach(), torch.tensor([2.0, -2.0]), atol=0.02)


def test_lion_l2sq_with_beta1_zero_is_sgd_with_decoupled_decay():
    x, _ = one_step(Lion, [1.0, -3.0], [0.5, 2.0], lr=0.1, betas=(0.0, 0.99), weight_decay=0.2, kappa="l2sq")
    expected = torch.tensor([1.0, -3.0]) - 0.1 * (torch.tensor([0.5, 2.0]) + 0.2 * torch.tensor([1.0, -3.0]))
    assert torch.allclose(x, expected)


def test_lion_kappa_menu():
    x, _ = one_step(Lion, [0.0, 0.0, 0.0], [0.1, -3.0, 1.0], lr=1.0, betas=(0.0, 0.99), kappa="huber", huber_delta=0.5)
    assert torch.allclose(x, -torch.tensor([0.2, -1.0, 1.0]))
    x, _ = one_step(Lion, [0.0, 0.0, 0.0], [0.1, -3.0, 1.0], lr=1.0, betas=(0.0, 0.99), kappa="linf")
    assert torch.allclose(x, torch.tensor([0.0, 1.0, 0.0]))
    x, _ = one_step(Lion, [0.0, 0.0], [0.1, -3.0], lr=1.0, betas=(0.0, 0.99), kappa=lambda c: 2 * c)
    assert torch.allclose(x, torch.tensor([-0.2, 6.0]))
    x, _ = one_step(Lion, [0.0, 0.0], [0.0, -3.0], lr=1.0, betas=(0.0, 0.99))
    assert torch.allclose(x, torch.tensor([0.0, 1.0]))  # sign(0) = 0
    with pytest.raises(ValueError, match="kappa"):
        Lion([torch.nn.Parameter(torch.zeros(1))], kappa="l3")


def test_stosign_is_unbiased_for_the_clipped_momentum():
    gen = torch.Generator().manual_seed(0)
    for m, big_g, expected in [(0.1, 0.3, 1 / 3), (0.05, 0.1, 0.5)]:
        noise = torch.rand(100_000, generator=gen) * 2 - 1
        assert float(torch.sign(m + big_g * noise).mean()) == pytest.approx(expected, abs=0.01)
    # the same through the optimizer: many coordinates with m = 0.1 and G forced to 0.3
    p = torch.nn.Parameter(torch.zeros(100_000))
    opt = StoSignSGD([p], lr=1.0, beta1=0.0, seed=3)
    p.grad = torch.full_like(p, 0.3)
    opt.step()  # G = 0.3
    before = p.detach().clone()
    p.grad = torch.full_like(p, 0.1)
    opt.step()
    assert float((before - p.detach()).mean()) == pytest.approx(1 / 3, abs=0.01)


def test_stosign_first_step_is_the_deterministic_sign():
    x, state = one_step(StoSignSGD, [1.0, 1.0, 1.0], [0.5, -2.0, 0.0], lr=0.1, beta1=0.9)
    assert torch.allclose(x, torch.tensor([0.9, 1.1, 1.0]))
    assert torch.allclose(state["max_abs"], torch.tensor([0.05, 0.2, 0.0]))


def test_stosign_running_max_never_decreases_and_zero_gradients_only_decay():
    p = torch.nn.Parameter(torch.ones(5))
    opt = StoSignSGD([p], lr=0.1, beta1=0.9, weight_decay=0.5, seed=1)
    gen = torch.Generator().manual_seed(2)
    previous = torch.zeros(5)
    for _ in range(20):
        p.grad = torch.randn(5, generator=gen)
        opt.step()
        current = opt.state[p]["max_abs"].clone()
        assert torch.all(current >= previous)
        previous = current
    q = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = StoSignSGD([q], lr=0.1, weight_decay=0.5)
    for _ in range(4):
        q.grad = torch.zeros(3)
        opt.step()
    assert torch.allclose(q.detach(), torch.full((3,), 2.0 * 0.95**4))


def test_stosign_is_reproducible_from_its_seed():
    def run(seed):
        p = torch.nn.Parameter(torch.zeros(50))
        opt = StoSignSGD([p], lr=0.1, seed=seed)
        for step in range(5):
            p.grad = torch.sin(torch.arange(50.0) + step)
            opt.step()
        return p.detach()

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_sign_optimizers_are_registered():
    assert registry.get("optimizer", "lion").target is Lion
    assert registry.get("optimizer", "lion_kappa").target is Lion
    assert registry.get("optimizer", "stosignsgd").target is StoSignSGD
