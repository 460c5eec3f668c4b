"""DAPO dynamic sampling (data_agents_eval.md A1): generate rounds until enough informative groups."""

from __future__ import annotations

from typing import Callable

import torch

from policylab.rollouts import Rollouts


class NotEnoughInformativeGroups(RuntimeError):
    pass


def collect_informative_groups(
    next_round: Callable[[int], Rollouts],
    keep_groups: Callable[[Rollouts], torch.Tensor],
    target_groups: int,
    max_rounds: int,
) -> tuple[Rollouts, dict[str, float]]:
    """Call ``next_round(round_index)`` (scored Rollouts with fresh group ids) and keep the groups that
    ``keep_groups`` accepts (bool per ``torch.unique(group)``), until ``target_groups`` survive; return
    exactly the first ``target_groups`` kept groups in accumulation order.

    ``max_rounds`` <= 0 means unlimited; otherwise running out raises NotEnoughInformativeGroups
    instead of training on a short or empty batch.
    """
    kept: list[Rollouts] = []
    kept_count = dropped = seen = rounds = 0
    while True:
        batch = next_round(rounds)
        rounds += 1
        keep = keep_groups(batch)
        groups = torch.unique(batch.group)
        survivors = groups[keep]
        seen += int(groups.numel())
        dropped += int((~keep).sum())
        if survivors.numel():
            kept.append(batch.select(torch.isin(batch.group, survivors)))
            kept_count += int(survivors.numel())
        if kept_count >= target_groups:
            merged = Rollouts.concat(kept)
            first = torch.unique_consecutive(merged.group)[:target_groups]
            # every declared per-row field follows its rows through concat and select (policylab.fields)
            merged = merged.select(torch.isin(merged.group, first))
            return merged, {"groups/filtered_frac": dropped / seen, "groups/gen_rounds": float(rounds),
                            "groups/kept_before_truncation": float(kept_count)}
        if 0 < max_rounds <= rounds:
            raise NotEnoughInformativeGroups(
                f"dynamic sampling: only {kept_count} of {target_groups} prompt groups had non-identical rewards after "
                f"{rounds} generation rounds (rollout.max_gen_batches); the data is too hard or too easy for the "
                "model: raise rollout.max_gen_batches or change the task")
