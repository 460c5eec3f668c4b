"""DPH-RL (arXiv:2509.07430): the rehearsal set — solved samples of the initial policy π0 with their π0
log-probs — on which a mass-covering f-divergence (policylab.algo.regularizers.divergence) is penalised.

Pure bookkeeping: which rollouts enter the buffer and which are drawn each step. The registered ``dph_rl``
component (policylab/annotate/rehearsal.py) runs the rehearsal samples through the policy with grad.
"""

from __future__ import annotations

import torch

from policylab.algo.group_stats import correctness
from policylab.rollouts import Rollouts


def solved_group_samples(rollouts: Rollouts, logp0: torch.Tensor, solved_k: int, room: int) -> list[dict[str, list]]:
    """One rehearsal sample per group whose first ``solved_k`` rollouts (or all, if fewer) are all correct:
    ``{"prompt": ids, "completion": ids, "logp0": π0 log-probs}`` of the group's first rollout, at most
    ``room`` of them; rows with an empty completion are skipped."""
    correct = correctness(rollouts)
    out: list[dict[str, list]] = []
    for g in torch.unique(rollouts.group).tolist():
        if len(out) >= room:
            break
        rows = (rollouts.group == g).nonzero().flatten()[:solved_k]
        if not bool((correct[rows] > 0).all()):
            continue
        i = int(rows[0])
        length = int(rollouts.completion_mask[i].sum())
        if length == 0:
            continue
        out.append({
            "prompt": rollouts.prompt_ids[i][rollouts.prompt_mask[i] > 0].tolist(),
            "completion": rollouts.completion_ids[i, :length].tolist(),
            "logp0": logp0[i, :length].float().cpu().tolist(),
        })
    return out


def draw(buffer: list, n: int, generator: torch.Generator) -> list:
    """``min(n, len(buffer))`` samples drawn with replacement (seeded); empty buffer -> []."""
    if not buffer:
        return []
    pick = torch.randint(len(buffer), (min(n, len(buffer)),), generator=generator)
    return [buffer[int(j)] for j in pick]
