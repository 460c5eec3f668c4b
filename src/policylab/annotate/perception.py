"""Components that compare the policy's predictions under the true and a corrupted prompt (the text
analogue of a masked image): PAPO's perception regularizer and VPPO's token weights.

Each one's ``annotate`` hook scores the batch's completions after corrupted prompts with the loop's
forward (:func:`policylab.annotate.prompt_perturbation.perturbed_prompt_logp`, i.e. ``ctx.score``) and
provides them as a declared field; the math is in ``policylab.algo``.
"""

from __future__ import annotations

import torch

from policylab.algo.regularizers.perception import PerceptionKLPenalty
from policylab.algo.token_weights.vppo import PerceptionTokenWeights
from policylab.annotate.prompt_perturbation import perturbed_prompt_logp
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

declare_field("papo_aug_logp", per_row=True, shape="[B,T]", dtype="float", owner="regularizer 'papo'",
              doc="log-prob of each completion token after a corrupted prompt (PAPO's perception reference), no grad")
declare_field("vppo_aug_logp", per_row=True, shape="[B,T]", dtype="float", owner="token_weights 'vppo'",
              doc="log-prob of each completion token after a corrupted prompt (VPPO's perception KL), no grad")


class _CorruptedPromptPass:
    """The corrupted-prompt scoring shared by PAPO and VPPO: each real prompt token replaced with
    probability ``mask_prob`` (the last ``protect_last`` kept; ours — the papers mask image patches),
    drawn from a seeded generator that is checkpointed."""

    def _init_pass(self, mask_prob: float, protect_last: int, seed: int) -> None:
        self.mask_prob, self.protect_last = mask_prob, protect_last
        self.generator = torch.Generator().manual_seed(seed)

    def _aug_logp(self, rollouts: Rollouts, ctx) -> torch.Tensor:
        return perturbed_prompt_logp(rollouts, ctx, mask_prob=self.mask_prob, protect_last=self.protect_last,
                                     generator=self.generator)


@register("regularizer", "papo", spec="arXiv:2507.06448 (MikeWangWZHL/PAPO dp_actor; text analogue)")
class PAPORegularizer(PerceptionKLPenalty, _CorruptedPromptPass):
    """PAPO (arXiv:2507.06448, text analogue): −γ·k3(log π_θ, aug) (the perception KL, maximised) plus the
    double entropy loss η_aug·(−aug) + η_ori·(−log π_θ), aug = log-probs after a corrupted prompt.

    The math is :class:`policylab.algo.regularizers.perception.PerceptionKLPenalty`; ``annotate`` provides
    ``papo_aug_logp`` through ``ctx.score`` (only when γ or η_aug is non-zero: otherwise it provides nothing).
    """

    def __init__(self, gamma: float = 0.01, eta_aug: float = 0.0, eta_ori: float = 0.0, kl_clip: float | None = None,
                 top_fraction: float | None = None, gamma_end: float | None = None, annealing_ratio: float = 1.0,
                 total_steps: int | None = None, mask_prob: float = 0.6, protect_last: int = 0, seed: int = 0):
        super().__init__(gamma, eta_aug, eta_ori, kl_clip, top_fraction, gamma_end, annealing_ratio, total_steps)
        self._init_pass(mask_prob, protect_last, seed)

    def provides(self) -> tuple[str, ...]:
        return (self.aug_field,) if self.needs_aug else ()

    requires = provides

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        if self.total_steps is None and getattr(ctx, "total_steps", 0):
            self.total_steps = ctx.total_steps  # gamma_end anneals over the run's train.steps
        return {self.aug_field: self._aug_logp(rollouts, ctx)} if self.needs_aug else {}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])


@register("token_weights", "vppo", spec="arXiv:2510.09285 (huaixuheqing/VPPO-RL dp_actor; text analogue)")
class VPPOWeights(PerceptionTokenWeights, _CorruptedPromptPass):
    """VPPO (arXiv:2510.09285, text analogue): weight mask·f_i on the ⌈ρ·L_i⌉ tokens with the largest
    κ = k3(old, aug), f_i the trajectory's min-max normalised mean κ rescaled to mean 1.

    The math is :class:`policylab.algo.token_weights.vppo.PerceptionTokenWeights`; ``annotate`` provides
    ``vppo_aug_logp`` (log-probs after a corrupted prompt) through ``ctx.score``.
    """

    provides = ("vppo_aug_logp",)
    requires = ("vppo_aug_logp",)

    def __init__(self, top_fraction: float = 0.4, scaling_min: float = 0.9, mask_prob: float = 0.6, protect_last: int = 0,
                 seed: int = 0):
        super().__init__(top_fraction, scaling_min)
        self._init_pass(mask_prob, protect_last, seed)

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        return {self.aug_field: self._aug_logp(rollouts, ctx)}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
