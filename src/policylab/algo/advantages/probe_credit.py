"""Step-level credit from probes and judges: where reasoning steps end, and how per-step signals reshape an
outcome advantage token by token.

- SPAE (arXiv:2601.03823): step potential Φ from answer-probe correctness and confidence, ΔΦ credit and an
  over-checking penalty after Φ saturates.
- GRPO-VPS (arXiv:2604.20659): group-standardised change of the probed gold-answer probability per segment.
- CAPO credit (arXiv:2508.02298): voted step flags become token rewards, normalised over the group's tokens.

The probe passes and judge calls that produce the per-step values run in ``policylab.annotate``
(answer_probes.py, step_credit.py); everything here is plain tensor and string arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from policylab.algo.group_stats import group_index

NO_SEGMENT = -1  # token outside every probed step (after the stop marker): keeps the outcome advantage


# -- step boundaries on token pieces ----------------------------------------------------------------


def segment_ends(pieces: Sequence[str], delimiter: str, *, stop_marker: str | None = None,
                 max_segments: int | None = None) -> list[int]:
    """Inclusive token positions that end a reasoning step.

    A step ends at the token where the text so far ends with ``delimiter`` (e.g. "\\n\\n"; SPAE uses
    ".\\n\\n"); scanning stops at the first token whose text so far contains ``stop_marker`` (e.g. "</think>").
    With more than ``max_segments`` ends, keep ``max_segments`` of them evenly spaced, always including the
    last (merging neighbouring steps; the choice of which to merge is ours).
    """
    ends: list[int] = []
    text = ""
    for t, piece in enumerate(pieces):
        text += piece
        if stop_marker and stop_marker in text:
            break
        if delimiter and text.endswith(delimiter):
            ends.append(t)
    if max_segments is not None and len(ends) > max_segments:
        if max_segments <= 0:
            return []
        keep = torch.linspace(0, len(ends) - 1, max_segments).round().long().tolist()
        ends = [ends[k] for k in sorted(set(keep))]
    return ends


def stop_position(pieces: Sequence[str], stop_marker: str | None) -> int | None:
    """First token position at which the text so far contains ``stop_marker`` (None if never)."""
    if not stop_marker:
        return None
    text = ""
    for t, piece in enumerate(pieces):
        text += piece
        if stop_marker in text:
            return t
    return None


def segment_of_tokens(ends: Sequence[int], length: int) -> Tensor:
    """[length] long: 0-based step index of each token (tokens after the last end get len(ends))."""
    seg = torch.full((length,), len(ends), dtype=torch.long)
    start = 0
    for k, end in enumerate(ends):
        seg[start : end + 1] = k
        start = end + 1
    return seg


def probed_segments(ends: Sequence[int], stop: int | None, width: int) -> Tensor:
    """[width] step index of each token, NO_SEGMENT from the stop marker on."""
    seg = segment_of_tokens(ends, width)
    if stop is not None:
        seg[stop:] = NO_SEGMENT
    return seg


def token_step_index(pieces: Sequence[str], delimiter: str) -> Tensor:
    """[len(pieces)] step of each token, steps as ``text.split(delimiter)`` makes them (token start offset)."""
    text = "".join(pieces)
    ends, pos = [], 0
    while delimiter:
        hit = text.find(delimiter, pos)
        if hit < 0:
            break
        pos = hit + len(delimiter)
        ends.append(pos)
    index, offset = [], 0
    for piece in pieces:
        index.append(sum(1 for e in ends if e <= offset))
        offset += len(piece)
    return torch.tensor(index, dtype=torch.long)


# -- SPAE (arXiv:2601.03823) ----------------------------------------------------------------------------


def spae_potential(acc: Tensor, conf: Tensor) -> Tensor:
    """Φ = 1.5·Acc·Conf + 0.5·Acc − Conf ∈ [−1, 1] (exact, from the released probe)."""
    return 1.5 * acc * conf + 0.5 * acc - conf


def spae_step_terms(potentials: Tensor, threshold: float = 0.9) -> tuple[Tensor, int | None]:
    """ΔΦ_k = Φ_k − Φ_{k−1} with ΔΦ_1 = 0, and the saturation step k* = first k with Φ_k > threshold (0-based)."""
    delta = torch.zeros_like(potentials)
    if potentials.numel() > 1:
        delta[1:] = potentials[1:] - potentials[:-1]
    above = (potentials > threshold).nonzero()
    return delta, (int(above[0]) if above.numel() else None)


def spae_token_advantages(adv: Tensor, segment: Tensor, potentials: Tensor, num_steps: Tensor, *,
                          alpha: float = 1.0, rho: float = 0.5, threshold: float = 0.9) -> Tensor:
    """A[i,t] = A_i + α·ΔΦ_{k(t)} − ρ·|A_i|·1[k(t) > k*] (reconstructed combination).

    ``segment`` [B,T]: 0-based step of each token; ``num_steps[i]`` for tokens after the last probed
    step but before the stop marker (ΔΦ = 0 there, still penalised past k*); NO_SEGMENT (after
    "</think>") keeps A_i. ``potentials`` [B,K] (NaN past num_steps). No step → A_i everywhere.
    """
    out = adv[:, None].expand(segment.shape).clone().float()
    for i in range(adv.shape[0]):
        k_i = min(int(num_steps[i]), potentials.shape[1])
        if k_i == 0:
            continue
        delta, k_star = spae_step_terms(potentials[i, :k_i].float(), threshold)
        delta = torch.cat([delta, delta.new_zeros(1)])  # the tail after the last probed step
        over = torch.zeros(k_i + 1, dtype=torch.bool)
        if k_star is not None:
            over[k_star + 1 :] = True
        seg = segment[i]
        inside = seg != NO_SEGMENT
        s = seg.clamp(min=0, max=k_i)
        shaped = adv[i] + alpha * delta[s] - rho * adv[i].abs() * over[s].float()
        out[i] = torch.where(inside, shaped, out[i])
    return out


def spae_metrics(correct: Tensor, segment: Tensor, potentials: Tensor, steps: Tensor, mask: Tensor,
                 threshold: float = 0.9) -> dict[str, float]:
    """Solving tokens (up to k*) vs checking tokens (after k*), right-to-wrong rate (Φ saturated but the final
    answer is wrong), mean ΔΦ."""
    solving = checking = 0.0
    right_to_wrong, deltas = [], []
    for i in range(segment.shape[0]):
        k = min(int(steps[i]), potentials.shape[1])
        if k == 0:
            continue
        delta, k_star = spae_step_terms(potentials[i, :k], threshold)
        deltas.append(delta)
        valid = (segment[i] != NO_SEGMENT) & (mask[i] > 0)
        if k_star is None:
            solving += float(valid.sum())
        else:
            solving += float((valid & (segment[i] <= k_star)).sum())
            checking += float((valid & (segment[i] > k_star)).sum())
        right_to_wrong.append(float(k_star is not None and correct[i] == 0))
    return {
        "spae/solving_tokens": solving,
        "spae/checking_tokens": checking,
        "spae/right_to_wrong": sum(right_to_wrong) / max(1, len(right_to_wrong)),
        "spae/mean_delta_phi": float(torch.cat(deltas).mean()) if deltas else 0.0,
    }


# -- GRPO-VPS (arXiv:2604.20659) -------------------------------------------------------------------------


def answer_probability(answer_logp: Tensor) -> Tensor:
    """p = exp(mean log π(y*_m | ...)) over the answer tokens only."""
    return answer_logp.mean().exp() if answer_logp.numel() else torch.tensor(float("nan"))


def vps_token_advantages(adv: Tensor, group: Tensor, probs: list[Tensor], segment: Tensor, *,
                         beta: float = 0.5, eps: float = 1e-6) -> Tensor:
    """A[i,t] = A_i + β·Δ̂_{k(t)} with Δ_k = p_k − p_{k−1}, Δ̂ standardised over all steps of the group.

    ``probs[i]`` = [p_0..p_K] (p_0: answer probed right after the prompt); ``segment`` [B,T] is the
    0-based step of each token; tokens with segment ≥ K or NO_SEGMENT keep A_i. Std is unbiased; fewer
    than two steps in a group, or std 0, gives Δ̂ = 0.
    """
    out = adv[:, None].expand(segment.shape).clone().float()
    deltas = [p[1:] - p[:-1] if p.numel() > 1 else p.new_zeros(0) for p in probs]
    idx, k = group_index(group)
    for g in range(k):
        rows = (idx == g).nonzero().flatten().tolist()
        pooled = torch.cat([deltas[i] for i in rows]) if rows else torch.zeros(0)
        if pooled.numel() < 2:
            continue
        mean, std = pooled.mean(), pooled.std()
        for i in rows:
            d = deltas[i]
            if d.numel() == 0:
                continue
            d_hat = (d - mean) / (std + eps)
            seg = segment[i]
            inside = (seg >= 0) & (seg < d.numel())
            out[i] = torch.where(inside, adv[i] + beta * d_hat[seg.clamp(0, d.numel() - 1)], out[i])
    return out


def vps_metrics(correct: Tensor, probs: list[Tensor]) -> dict[str, float]:
    """Mean Δ on correct vs incorrect rollouts and the share of segments with Δ < 0."""
    by_outcome: dict[int, list[Tensor]] = {0: [], 1: []}
    for i, p in enumerate(probs):
        if p.numel() > 1:
            by_outcome[int(correct[i])].append(p[1:] - p[:-1])
    every = by_outcome[0] + by_outcome[1]
    pooled = torch.cat(every) if every else torch.zeros(0)

    def mean_of(parts):
        return float(torch.cat(parts).mean()) if parts else 0.0

    return {
        "vps/delta_correct": mean_of(by_outcome[1]),
        "vps/delta_incorrect": mean_of(by_outcome[0]),
        "vps/negative_step_share": float((pooled < 0).float().mean()) if pooled.numel() else 0.0,
    }


# -- CAPO credit (arXiv:2508.02298) ----------------------------------------------------------------------

VOTING = ("majority", "intersection", "average")


def vote(critiques: Sequence[Sequence[bool] | None], num_steps: int, mode: str = "majority") -> Tensor:
    """Per-step flag f_k from K critiques (unparsable ones are left out): majority (> K/2), intersection
    (flagged by all), or average (fraction flagging). No usable critique -> no flags."""
    if mode not in VOTING:
        raise ValueError(f"capo voting must be one of {VOTING}, got {mode!r}")
    usable = [c for c in critiques if c is not None]
    if not usable or num_steps == 0:
        return torch.zeros(num_steps)
    flagged = torch.zeros(num_steps)
    for c in usable:
        for k in range(min(num_steps, len(c))):
            flagged[k] += 0.0 if c[k] else 1.0
    k_total = len(usable)
    if mode == "average":
        return flagged / k_total
    if mode == "majority":
        return (flagged > k_total / 2).float()
    return (flagged == k_total).float()


def capo_token_rewards(outcome: Tensor, flags: Tensor, *, w_whole: float = 2.0, w_proc: float = 1.0) -> Tensor:
    """R[i,t] = W_whole·r_i − W_proc·f[i,t] (f = the vote of the step holding token t)."""
    return w_whole * outcome[:, None] - w_proc * flags


def token_group_normalise(values: Tensor, mask: Tensor, group: Tensor, valid_rows: Tensor, eps: float = 1e-6) -> Tensor:
    """(R − m_g)/(s_g + eps), m_g and unbiased s_g over all valid tokens of the group's valid rows.
    A group with one rollout uses m = 0, s = 1 (§0 singleton convention); fewer than two tokens: s = 1."""
    out = torch.zeros_like(values)
    idx, k = group_index(group)
    for g in range(k):
        rows = ((idx == g) & valid_rows).nonzero().flatten()
        if rows.numel() == 0:
            continue
        tokens = values[rows][mask[rows] > 0]
        if rows.numel() == 1 or tokens.numel() < 2:
            mean, std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean, std = tokens.mean(), tokens.std()
        out[rows] = (values[rows] - mean) / (std + eps)
    return out * mask
