"""GUI-G1's difficulty-aware sample weights (arXiv:2505.15810): hard samples are not under-optimised.

Each sample's loss is scaled by a difficulty coefficient w_i (the dataset's ``rate`` in the released code;
reconstructed pass-rate and box-size definitions), together with mean-only advantages (``dr_grpo``) and a
constant length normaliser (aggregate ``seq-mean-token-sum-norm``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def difficulty_weights(rows: list[dict], *, source: str = "rate", field: str = "rate", mean_value: float | None = None,
                       low: float = 0.5, high: float = 2.0) -> Tensor:
    """Per-sample difficulty coefficient w_i.

    "rate": the dataset's ``field`` as given (released code; absent -> 1). "pass_rate": text analogue
    w = clip((1 − p̂_q)/(1 − p̄), low, high) from an offline pass rate. "box": GUI grounding
    w = clip(sqrt(ā/a_i), low, high), a_i = relative target size. p̄ / ā default to the batch mean.
    """
    if source == "rate":
        return torch.tensor([float(r.get(field, 1.0)) for r in rows])
    if source not in ("pass_rate", "box"):
        raise ValueError(f"gui_g1 source must be 'rate', 'pass_rate' or 'box', got {source!r}")
    missing = [i for i, r in enumerate(rows) if field not in r]
    if missing:
        raise ValueError(f"gui_g1 source {source!r} needs the row field {field!r}; rows {missing[:5]} lack it")
    values = torch.tensor([float(r[field]) for r in rows], dtype=torch.float64)
    mean = float(values.mean()) if mean_value is None else mean_value
    if source == "pass_rate":
        w = (1 - values) / max(1e-8, 1 - mean)
    else:
        w = torch.sqrt(mean / values.clamp(min=1e-12))
    return w.clamp(low, high).float()


@register("token_weights", "gui_g1", spec="arXiv:2505.15810 (Yuqi-Zhou/GUI-G1 grpo_trainer loss; difficulty reconstructed)",
          requires=("rows",))
def gui_g1_weights(out: PolicyOutputs, batch: Rollouts, *, source: str = "rate", field: str = "rate",
                   mean_value: float | None = None, low: float = 0.5, high: float = 2.0) -> tuple[Tensor, dict]:
    """GUI-G1 (arXiv:2505.15810) difficulty scaling: every token of sample i is weighted by its difficulty w_i.

    Use with ``advantage: dr_grpo`` (no std division) and ``aggregate: seq-mean-token-sum-norm`` with
    ``rollout.max_new_tokens`` equal to the constant T_c (64 in the released code): loss =
    mean_i(w_i·Σ_t ℓ·M / T_c). The difficulty definition is reconstructed (see ``difficulty_weights``).
    """
    w = difficulty_weights(batch.rows, source=source, field=field, mean_value=mean_value, low=low, high=high)
    if w.numel() != batch.batch_size:
        raise ValueError(f"gui_g1 needs one row per completion; got {w.numel()} rows for batch {batch.batch_size}")
    weights = w.to(out.logp.device)[:, None].expand_as(out.logp)
    return weights, {"gui_g1/mean_weight": w.mean()}
