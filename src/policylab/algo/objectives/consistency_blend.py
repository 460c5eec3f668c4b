"""COPO's loss blend (arXiv:2508.04138): a per-token mix of two clipped surrogates, one on the local (GRPO)
advantage and one on the global (cross-prompt) advantage, weighted by the group's answer consistency.

The parts come from the "copo" advantage (:mod:`policylab.algo.advantages.process_and_global`), which provides
them in its ``annotate`` pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.process_and_global import GLOBAL_ADV, LOCAL_ADV, LOCAL_WEIGHT
from policylab.algo.objectives.policy_gradient import clipped_surrogate, masked_mean, ratio_metrics, token_log_ratio
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


@register("objective", "copo", spec="arXiv:2508.04138 (per-token blend of local and global clipped surrogates)",
          requires=(LOCAL_ADV.name, GLOBAL_ADV.name, LOCAL_WEIGHT.name), tags=("skip:T-ZEROADV", "skip:T-ONPOL"))
def copo_loss(out: PolicyOutputs, batch: Rollouts, *, eps_low: float = 0.2, eps_high: float = 0.2,
              dual_clip_c: float | None = None) -> tuple[Tensor, dict]:
    """COPO (arXiv:2508.04138): l = (1 - w)·l_PPO(A^glob) + w·l_PPO(A^loc), two PPO-clip surrogates with one
    ratio, clip range and dual clip, blended per row by the local weight w.

    Requires the parts the "copo" advantage provides (``copo_local_advantage``, ``copo_global_advantage``,
    ``copo_local_weight``). On-policy it equals REINFORCE with the blended advantage.

    Shared test T-ONPOL is replaced by its own test: on-policy it is REINFORCE with the blended advantage it
    reads from the fields, not with ``rollouts.advantages`` (tests/test_advantages_process_global.py).
    Shared test T-ZEROADV does not hold by design: a group whose rewards are all equal still has a global
    advantage (its accuracy against the other prompts'), so it is trained through the (1 - w) term.
    """
    missing = [f.name for f in (LOCAL_ADV, GLOBAL_ADV, LOCAL_WEIGHT) if f.name not in batch.extras]
    if missing:
        raise ValueError(f"objective 'copo' needs rollouts.extras {missing}: use it with the 'copo' advantage, "
                         "whose annotate pass provides them")
    mask = batch.completion_mask
    log_ratio = token_log_ratio(out, batch)
    ratio = torch.exp(log_ratio)
    metrics = ratio_metrics(ratio, log_ratio, mask)
    w = batch.extras[LOCAL_WEIGHT.name].float()[:, None]
    local = batch.extras[LOCAL_ADV.name].float()[:, None] * mask
    glob = batch.extras[GLOBAL_ADV.name].float()[:, None] * mask
    local_loss, local_clipped, _ = clipped_surrogate(ratio, local, eps_low, eps_high, dual_clip_c)
    global_loss, global_clipped, _ = clipped_surrogate(ratio, glob, eps_low, eps_high, dual_clip_c)
    metrics["clipfrac"] = masked_mean(local_clipped.float(), mask)
    metrics["copo/global_clipfrac"] = masked_mean(global_clipped.float(), mask)
    metrics["copo/local_weight"] = masked_mean(w.expand_as(mask), mask)
    return (1 - w) * global_loss + w * local_loss, metrics
