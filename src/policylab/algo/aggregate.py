"""Loss aggregation modes: how a per-token loss [B,T] becomes the scalar the optimizer minimises.

Every mode divides a micro-batch's masked loss sum by a *global* normaliser of the optimizer
mini-batch, so summing micro-batch losses reproduces the full-batch loss (test T-MICRO).
"""

from __future__ import annotations

from torch import Tensor

from policylab.registry import register
from policylab.rollouts import Normaliser


@register("aggregate", "token-mean", spec="arXiv:2503.14476 §3.3 (DAPO token-level policy gradient loss)")
def token_mean(loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """sum_{i,t} m*l / N_tok, N_tok = trained tokens of the whole mini-batch (DAPO, TRL 'dapo')."""
    return (loss * mask).sum() / norm.num_tokens


@register("aggregate", "seq-mean-token-mean", spec="arXiv:2402.03300 §4.1 eq. 3 (GRPO)")
def seq_mean_token_mean(loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """(1/N_seq) sum_i (sum_t m*l / L_i), N_seq = sequences with L_i > 0 (original GRPO)."""
    lengths = mask.sum(-1)
    per_seq = (loss * mask).sum(-1) / lengths.clamp(min=1)
    return per_seq.sum() / norm.num_seqs


@register("aggregate", "seq-mean-token-sum", spec="verl loss_agg_mode 'seq-mean-token-sum'")
def seq_mean_token_sum(loss: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """(1/N_seq) sum_i sum_t m*l."""
    return (loss * mask).sum() / norm.num_seqs


@register("aggregate", "seq-mean-token-sum-norm", spec="arXiv:2503.20783 §3.1 (Dr. GRPO)")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, norm: Normaliser, *, norm_constant: str = "batch_x_max_len") -> Tensor:
    """sum_{i,t} m*l / C with a constant C (Dr. GRPO).

    ``norm_constant``: "batch_x_max_len" (TRL dr_grpo and the advantages spec: C = B * max_new_tokens,
    our default) or "max_len" (verl: C = max_new_tokens, no division by B). Never the batch's max length.
    """
    if norm_constant == "batch_x_max_len":
        denom = norm.batch_size * norm.max_len
    elif norm_constant == "max_len":
        denom = norm.max_len
    else:
        raise ValueError(f"norm_constant must be 'batch_x_max_len' or 'max_len', got {norm_constant!r}")
    return (loss * mask).sum() / denom
