"""Sign-based optimizers: Lion with its kappa generalisation, and StoSignSGD.

Both are drop-in ``torch.optim.Optimizer`` classes, registered under kind "optimizer"; recipes set them as
``optimizer: {name: lion, lr: ..., weight_decay: ...}``. Weight decay is decoupled: x <- x - lr*(u + lambda*x)
with the decay applied to the parameter before this step's update.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from policylab.registry import register


def kappa_l1(c: Tensor) -> Tensor:
    """grad ||c||_1 = sign(c) (sign(0) = 0): Lion."""
    return torch.sign(c)


def kappa_l2sq(c: Tensor) -> Tensor:
    """grad (1/2)||c||^2 = c: momentum SGD with decoupled decay."""
    return c


def kappa_linf(c: Tensor) -> Tensor:
    """A subgradient of ||c||_inf: sign(c_j) on one argmax coordinate of |c|, 0 elsewhere."""
    out = torch.zeros_like(c)
    if c.numel():
        j = c.abs().flatten().argmax()
        out.view(-1)[j] = torch.sign(c.flatten()[j])
    return out


def kappa_huber(delta: float) -> Callable[[Tensor], Tensor]:
    """grad of the Huber function with threshold delta: clip(c/delta, -1, 1)."""
    if delta <= 0:
        raise ValueError(f"huber_delta must be > 0, got {delta}")
    return lambda c: (c / delta).clamp(-1.0, 1.0)


KAPPAS = ("l1", "l2sq", "huber", "linf")


def resolve_kappa(kappa: str | Callable[[Tensor], Tensor], huber_delta: float) -> Callable[[Tensor], Tensor]:
    if callable(kappa):
        return kappa
    if kappa == "l1":
        return kappa_l1
    if kappa == "l2sq":
        return kappa_l2sq
    if kappa == "huber":
        return kappa_huber(huber_delta)
    if kappa == "linf":
        return kappa_linf
    raise ValueError(f"lion kappa must be one of {', '.join(KAPPAS)} or a callable, got {kappa!r}")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., arXiv:2302.06675 Program 1) / Lion-kappa (arXiv:2310.05898), per parameter tensor:

    c_t = beta1*m_{t-1} + (1-beta1)*g_t;  x_t = x_{t-1} - lr*(grad_kappa(c_t) + lambda*x_{t-1});
    m_t = beta2*m_{t-1} + (1-beta2)*g_t (after the step, from the old m).

    ``kappa``: "l1" (sign: Lion, default), "l2sq" (identity), "huber" (clip(c/huber_delta, -1, 1)), "linf"
    (one-hot sign at the argmax) or any callable c -> direction. With kappa = l1 and weight decay lambda the
    iterates approach the box ||x||_inf <= 1/lambda. Lion wants an lr 3-10x smaller and a weight decay 3-10x
    larger than AdamW's.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 kappa: str | Callable[[Tensor], Tensor] = "l1", huber_delta: float = 1.0):
        if lr < 0:
            raise ValueError(f"lion lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"lion betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"lion weight_decay must be >= 0, got {weight_decay}")
        resolve_kappa(kappa, huber_delta)  # fail at construction, not at the first step
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, kappa=kappa,
                                      huber_delta=huber_delta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            direction_of = resolve_kappa(group["kappa"], group["huber_delta"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                g = p.grad
                c = beta1 * m + (1 - beta1) * g
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction_of(c), alpha=-group["lr"])
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss


register("optimizer", "lion", spec="arXiv:2302.06675 Program 1; Lion-kappa arXiv:2310.05898", aliases=("lion_kappa",))(Lion)


class StoSignSGD(torch.optim.Optimizer):
    """StoSignSGD (Yu et al., arXiv:2604.15416): an unbiased stochastic sign of the momentum, per parameter tensor:

    m_t = beta1*m_{t-1} + (1-beta1)*g_t;  G_t = max(G_{t-1}, |m_t|) (elementwise, G_0 = 0);
    n_t ~ U[-1,1]^d;  x_{t+1} = x_t - lr*sign(m_t + G_t*n_t) - lr*lambda*x_t.

    For |m| <= G, E[sign(m + G*n)] = m/G: in expectation a magnitude-aware momentum step, one bit per
    coordinate. Coordinates with G = 0 do not move (besides decay). The noise is drawn from a generator seeded
    with (seed, step), so a run is reproducible and resumes identically.
    """

    def __init__(self, params, lr: float = 1e-4, beta1: float = 0.9, weight_decay: float = 0.0, seed: int = 0):
        if lr < 0:
            raise ValueError(f"stosignsgd lr must be >= 0, got {lr}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"stosignsgd beta1 must be in [0, 1), got {beta1}")
        if weight_decay < 0:
            raise ValueError(f"stosignsgd weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, beta1=beta1, weight_decay=weight_decay))
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(hash((self.seed, step, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        return gen

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["max_abs"] = torch.zeros_like(p)
                    state["step"] = 0
                state["step"] += 1
                m, running_max = state["exp_avg"], state["max_abs"]
                m.mul_(group["beta1"]).add_(p.grad, alpha=1 - group["beta1"])
                torch.maximum(running_max, m.abs(), out=running_max)
                gen = self._generator(p.device, state["step"], index)
                noise = torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype).mul_(2).sub_(1)
                direction = torch.sign(m + running_max * noise)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction, alpha=-group["lr"])
        return loss


register("optimizer", "stosignsgd", spec="arXiv:2604.15416 (update equations from a secondary source)")(StoSignSGD)
