"""Helpers shared by the objectives of this package: sequence statistics, labels from rewards, and the
bridge from sequence-, pair- or batch-level losses to the per-token loss contract.

The per-token contract (``loss [B,T]``, aggregated by the recipe) was made for token surrogates. A loss
defined per sequence or per batch (DPO, KTO, CoPG, TRPA, REAL, PACS) is spread over each sequence's
tokens with weight 1/L_i, so that ``sum_t l[i,t] = s_i``; the ``seq-mean-token-sum`` aggregation then
returns ``mean_i s_i`` (sequences with L_i > 0). Each objective says which s_i it uses, and its
``prepare`` checks that the recipe chose that aggregation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from policylab.rollouts import Rollouts

log = logging.getLogger(__name__)

SEQUENCE_LEVEL_AGGREGATE = "seq-mean-token-sum"
_warned_split_groups: set[str] = set()


def lengths_of(mask: Tensor) -> Tensor:
    return mask.sum(-1)


def seq_sum(values: Tensor, mask: Tensor) -> Tensor:
    """[B] sum_t m*x."""
    return (values * mask).sum(-1)


def seq_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[B] (1/L_i) sum_t m*x; 0 for an empty row."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def spread_row_losses(row_loss: Tensor, mask: Tensor) -> Tensor:
    """l[i,t] = s_i * m[i,t] / L_i: sum_t l[i,t] = s_i, so seq-mean-token-sum gives mean_i s_i."""
    return row_loss[:, None] * mask / mask.sum(-1, keepdim=True).clamp(min=1)


def spread_batch_loss(total: Tensor, mask: Tensor) -> Tensor:
    """Every non-empty row carries the whole micro-batch objective S (s_i = S), so seq-mean-token-sum
    over one micro-batch returns S exactly, value and gradient (the aggregation is linear)."""
    return spread_row_losses(total.expand(mask.shape[0]), mask)


def labels_from_rewards(batch: Rollouts, threshold: float) -> tuple[Tensor, Tensor]:
    """(correct [B] bool, usable [B] bool): correct = reward > threshold; usable = reward not NaN and
    the row has trained tokens (an empty row has no log-prob to classify)."""
    if batch.rewards is None:
        raise ValueError("this objective needs rollouts.rewards (labels come from the verifier)")
    r = batch.rewards.float()
    usable = ~torch.isnan(r) & (batch.completion_mask.sum(-1) > 0)
    correct = torch.nan_to_num(r, nan=0.0) > threshold
    return correct & usable, usable


def group_sum(values: Tensor, idx: Tensor, k: int) -> Tensor:
    return torch.zeros(k, dtype=values.dtype, device=values.device).index_add(0, idx.to(values.device), values)


def pairs_within_groups(group: Tensor, better: Tensor) -> Tensor:
    """[P,2] (winner, loser) index pairs of rows in the same group with ``better[i, j]`` True."""
    same = group[:, None] == group[None, :]
    return (same & better).nonzero()


# ---------------------------------------------------------------------------------------------------
# checks run by prepare(): the recipe must give these objectives what their math assumes


def check_aggregate(ctx: Any, objective: str, allowed: tuple[str, ...] = (SEQUENCE_LEVEL_AGGREGATE,)) -> None:
    config = getattr(ctx, "config", None)
    if config is None:
        return
    name = config.algorithm.aggregate.name
    if name not in allowed:
        raise ValueError(
            f"objective {objective!r} spreads a sequence-level loss over tokens with weight 1/L_i; set "
            f"algorithm.aggregate to {' or '.join(repr(a) for a in allowed)} (got {name!r})"
        )


def check_whole_groups(ctx: Any, batch: Rollouts, objective: str) -> bool:
    """True when one micro-batch holds the whole rollout batch, as a loss that couples the rows of a prompt needs.

    The loop cuts micro-batches by length, so with a smaller micro_batch_size a prompt's rows are split and each
    micro-batch sees partial groups (pairs whose two rows fall apart are lost). That still trains, so it is a
    warning (once per objective), not an error; the recipes set micro_batch_size >= rows per step.
    """
    config = getattr(ctx, "config", None)
    if config is None:
        return True
    train = config.train
    whole = train.micro_batch_size >= batch.batch_size and train.mini_batches == 1
    if not whole and objective not in _warned_split_groups:
        _warned_split_groups.add(objective)
        log.warning(
            "objective %r couples all rows of a prompt in one loss call, but train.micro_batch_size = %d < %d rows "
            "per step (or mini_batches = %d > 1): micro-batches split prompts and the loss sees partial groups. "
            "Set train.micro_batch_size >= %d and train.mini_batches = 1 for the spec's loss.",
            objective, train.micro_batch_size, batch.batch_size, train.mini_batches, batch.batch_size)
    return whole


def aggregate_denominator(aggregate: str, mask: Tensor, params: dict | None = None) -> float:
    """The mini-batch normaliser of ``aggregate`` for the rows of ``mask`` (objectives.md §0), used to
    give two parts of one batch their own normalisation (SRPO routes, PIPO layback rows)."""
    lengths = mask.sum(-1)
    if aggregate == "token-mean":
        return float(mask.sum())
    if aggregate in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float((lengths > 0).sum())
    if aggregate == "seq-mean-token-sum-norm":
        if (params or {}).get("norm_constant", "batch_x_max_len") == "max_len":
            return 1.0
        return float(mask.shape[0])
    raise ValueError(f"no normaliser known for aggregate {aggregate!r}")


def part_scales(ctx: Any, mask: Tensor, parts: list[Tensor]) -> Tensor:
    """[B] per-row factor n_all/n_part (n = the recipe aggregate's denominator) so that one aggregation
    over the whole batch equals the sum of each part aggregated on its own. Parts are disjoint bool [B]."""
    config = getattr(ctx, "config", None)
    aggregate = config.algorithm.aggregate.name if config is not None else "token-mean"
    params = config.algorithm.aggregate.params if config is not None else {}
    total = aggregate_denominator(aggregate, mask, params)
    scale = torch.zeros(mask.shape[0])
    for part in parts:
        n = aggregate_denominator(aggregate, mask[part], params)
        if n > 0:
            scale[part] = total / n
    return scale
