"""Teacher-forced scoring annotators: reference log-probs and collection-time policy entropies.

Both are added to a run automatically when a component ``requires`` their field and nothing else in the
recipe provides it (``auto_provider = True``); they use the loop's one optimised forward (``ctx.score``).
"""

from __future__ import annotations

from policylab.registry import register
from policylab.rollouts import Rollouts


@register("annotator", "reference_logp", spec="frozen reference policy (KL regularisers, DPO-style objectives)")
class ReferenceLogp:
    """log pi_ref(y_t | x, y_<t) [B,T] of every completion token under the frozen reference model."""

    provides = ("ref_logp",)
    needs_reference_model = True
    auto_provider = True

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        return {"ref_logp": ctx.score(rollouts, model=ctx.reference).logp}


@register("annotator", "policy_entropy", spec="token entropy of the sampling policy at collection time")
class PolicyEntropy:
    """H(pi_theta(. | x, y_<t)) [B,T] of the current policy over each completion position, without grad."""

    provides = ("entropy",)
    auto_provider = True

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        return {"entropy": ctx.score(rollouts).entropy}
