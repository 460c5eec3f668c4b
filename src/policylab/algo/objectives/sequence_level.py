"""Sequence-, pair- and batch-level losses in the per-token loss contract.

The per-token contract (``loss [B,T]``, aggregated by the recipe) was made for token surrogates. A loss
defined per sequence or per batch (DPO, KTO, CoPG, TRPA, REAL, PACS) is spread over each sequence's
tokens with weight 1/L_i, so that ``sum_t l[i,t] = s_i``; the ``seq-mean-token-sum`` aggregation then
returns ``mean_i s_i`` (sequences with L_i > 0). Each such objective says which s_i it uses and names the
aggregation its math is written for in its ``aggregates`` declaration (the recipes set it; the tests check).

A loss made of parts that the spec normalises separately (SRPO's routes, PIPO's layback rows) uses
:func:`part_scales` so that one token-mean over the batch equals the sum of the parts' own token-means.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEQUENCE_LEVEL_AGGREGATE = "seq-mean-token-sum"


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


def part_scales(mask: Tensor, parts: list[Tensor]) -> Tensor:
    """[B] per-row factor n_all/n_part (n = trained tokens) so that ONE token-mean aggregation over the whole
    batch equals the sum of each part's own token-mean. Parts are disjoint bool [B]; rows in no part get 0."""
    total = float(mask.sum())
    scale = torch.zeros(mask.shape[0])
    for part in parts:
        n = float(mask[part].sum())
        if n > 0:
            scale[part] = total / n
    return scale
