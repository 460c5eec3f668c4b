"""Components that re-apply the policy's output layer to the training forward's hidden states: SIREN's
nucleus entropy (a regularizer) and CAPO-curvature's top-k logits (token weights).

Their math is in ``policylab.algo``; here each one's ``annotate`` hook, once per batch, hands it the
policy's output layer (``ctx.policy.get_output_embeddings()``) and the training temperature
(``ctx.temperature``). The hook provides no field (``provides = ()``): it only binds that state.
"""

from __future__ import annotations

from policylab.algo.regularizers.entropy import SelectiveEntropyPenalty
from policylab.algo.token_weights.capo_curvature import CapoCurvature
from policylab.registry import register
from policylab.rollouts import Rollouts


def _bind(component, ctx, who: str) -> dict:
    policy = getattr(ctx, "policy", None)
    if policy is None:
        raise ValueError(f"{who} needs ctx.policy in annotate() (its output layer turns hidden states into logits)")
    head = policy.get_output_embeddings()
    component.bind_output_layer(head.weight, getattr(head, "bias", None), float(getattr(ctx, "temperature", 1.0)))
    return {}


@register("regularizer", "siren", spec="arXiv:2509.25133 (Linn3a/siren dp_actor siren branch)")
class SIRENRegularizer(SelectiveEntropyPenalty):
    """SIREN (arXiv:2509.25133): c·(H_sel − H_anchor)², H_sel the mean over responses of the nucleus (top-p)
    entropy on each response's peak-entropy tokens, H_anchor its value at the first step.

    The math is :class:`policylab.algo.regularizers.entropy.SelectiveEntropyPenalty`; ``annotate`` binds the
    policy's output layer and the training temperature (no field). ``aggregate`` must name the recipe's
    aggregation (the paper's is seq-mean-token-sum-norm) so the scalar penalty is spread exactly.
    """

    provides = ()

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        return _bind(self, ctx, "siren")


@register("token_weights", "capo_curvature", spec="arXiv:2510.00819 (luckeciano/stable-pg-llm, token-level masks)")
class CapoCurvatureWeights(CapoCurvature):
    """CAPO-curvature (arXiv:2510.00819): a 0/1 mask keeping the tokens whose predicted last-layer update
    stays within the curvature (|dJ| < tau_hessian) and KL (< tau_fisher) trust region.

    The math is :class:`policylab.algo.token_weights.capo_curvature.CapoCurvature`; ``annotate`` binds the
    policy's output layer and the training temperature (no field).
    """

    provides = ()

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        return _bind(self, ctx, "capo_curvature")
