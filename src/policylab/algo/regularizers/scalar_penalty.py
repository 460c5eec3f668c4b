"""Scalar penalties (SIREN's squared entropy gap, DPH-RL's rehearsal divergence) as per-token losses.

A regularizer returns a per-token loss [B,T] that the recipe's aggregation sums over micro-batches with a
global normaliser. :func:`spread_scalar` lays a scalar over a micro-batch's tokens so that this
aggregation returns exactly the scalar over the whole mini-batch; it must know which aggregation the
recipe uses, so such regularizers take it as their ``aggregate`` parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_aggregate(aggregate: str, who: str) -> str:
    """``aggregate`` if :func:`spread_scalar` supports it, else a ValueError naming ``who``."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"{who} spreads a scalar penalty for the recipe's aggregation; aggregate must be one of "
                         f"{', '.join(AGGREGATES)} (got {aggregate!r})")
    return aggregate


def needs_max_len(aggregate: str) -> bool:
    """seq-mean-token-sum-norm divides by B·max_new_tokens, so its spread reads the ``max_new_tokens`` field."""
    return aggregate == "seq-mean-token-sum-norm"


def spread_scalar(value: Tensor, mask: Tensor, aggregate: str = "token-mean", max_len: float = 1.0) -> Tensor:
    """Per-token loss whose aggregation with ``aggregate`` (global normaliser) sums to ``value`` over a mini-batch.

    token-mean / seq-mean-token-mean: value on every token; seq-mean-token-sum: value/L_i;
    seq-mean-token-sum-norm (norm_constant batch_x_max_len, C = B·max_len): value·max_len/L_i (exact when
    no row is empty).
    """
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    ones = torch.ones_like(mask, dtype=value.dtype) if isinstance(value, Tensor) else torch.ones_like(mask)
    if aggregate in ("token-mean", "seq-mean-token-mean"):
        return value * ones
    if aggregate == "seq-mean-token-sum":
        return value * ones / lengths
    if aggregate == "seq-mean-token-sum-norm":
        return value * ones * max_len / lengths
    raise ValueError(f"cannot spread a scalar penalty for aggregate {aggregate!r}; valid: {AGGREGATES}")


def max_len_of(batch, aggregate: str) -> float:
    """The constant length normaliser for ``aggregate`` from the loop's ``max_new_tokens`` field (1 if unused)."""
    if not needs_max_len(aggregate):
        return 1.0
    if "max_new_tokens" not in batch.extras:
        raise ValueError("a scalar penalty under seq-mean-token-sum-norm needs the max_new_tokens field (set by the loop)")
    return float(batch.extras["max_new_tokens"])
