"""Token entropies of the frozen reference (base) model on the batch's completions.

ReasonMaxxer (arXiv:2605.06241) gates its loss by the BASE model's entropy at each token; when its rollouts do not
come from the base (``offline: false``) that entropy is a reference-model pass, provided here as ``base_entropy``.
"""

from __future__ import annotations

from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

BASE_ENTROPY = declare_field("base_entropy", per_row=True, shape="[B,T]", dtype="float", owner="annotator 'base_entropy'",
                             doc="H(pi_ref(. | x, y_<t)) of the frozen reference (base) model at each completion position")


@register("annotator", "base_entropy", spec="arXiv:2605.06241 (ReasonMaxxer: base-model entropies)")
class BaseEntropy:
    """H(pi_ref(. | x, y_<t)) [B,T]: the frozen reference model's token entropy over each completion position,
    without grad (the loop's teacher-forced forward, ``ctx.score`` with ``model=ctx.reference``). Added
    automatically when a component requires ``base_entropy``."""

    provides = (BASE_ENTROPY,)
    needs_reference_model = True
    auto_provider = True

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        return {"base_entropy": ctx.score(rollouts, model=ctx.reference).entropy.float()}
