"""Evaluation metrics of data_agents_eval.md Part E, as pure functions of numbers and tensors.

Each function names its spec item. Nothing here samples, loads a model or writes a file: the
sampling lives in :mod:`policylab.eval.evaluate` and the cross-run statistics in
:mod:`policylab.eval.stats`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# E1. pass@k


def pass_at_k(num_samples: int, num_correct: int, k: int, *, exact: bool = False) -> float | Fraction:
    """Unbiased pass@k of one problem (E1): ``1 - C(n-c, k) / C(n, k)``.

    Computed in the stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (never factorials);
    ``exact=True`` does the same product in rationals and returns a ``Fraction``.
    """
    n, c = int(num_samples), int(num_correct)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if n < k:
        raise ValueError(f"pass@k needs n >= k samples per problem, got n={n} < k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= num_correct <= n, got num_correct={c}, n={n}")
    one = Fraction(1) if exact else 1.0
    if n - c < k:  # every k-subset contains a correct sample
        return one
    survive = one  # probability that a random k-subset holds no correct sample
    for i in range(n - c + 1, n + 1):
        survive *= one - Fraction(k, i) if exact else 1.0 - k / i
    return one - survive


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (E1); ``num_samples[i]``/``num_correct[i]`` describe problem i."""
    if len(num_samples) != len(num_correct):
        raise ValueError(f"mean_pass_at_k: {len(num_samples)} sample counts but {len(num_correct)} correct counts")
    if not num_samples:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)) / len(num_samples)


def pass_at_k_curve(num_samples: Sequence[int], num_correct: Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """``{k: mean pass@k}`` for every requested k (each must be <= every problem's n)."""
    return {int(k): mean_pass_at_k(num_samples, num_correct, int(k)) for k in ks}


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself: the k values a pass@k curve is drawn at."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n >= 1 else []


# ----------------------------------------------------------------------------------------------
# E2. maj@k

INVALID = -1  # cluster id of unparsable answers: it can win the vote but is never correct


def numeric_or_text_equal(a: str, b: str) -> bool:
    """Default answer equivalence for voting: equal as exact rationals ('1/2' == '0.5'), else as
    case-folded text with whitespace removed. Pass the C1 math verifier for LaTeX answers."""
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return "".join(a.split()).casefold() == "".join(b.split()).casefold()


def _as_fraction(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def cluster_answers(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = numeric_or_text_equal
) -> list[int]:
    """Cluster id per sample (E2): samples with equivalent answers share an id; ``None`` or empty
    answers (nothing extracted) get :data:`INVALID`. Ids count up from 0 in order of first appearance."""
    representatives: list[str] = []
    ids: list[int] = []
    for answer in answers:
        if answer is None or not str(answer).strip():
            ids.append(INVALID)
            continue
        for cid, rep in enumerate(representatives):
            if equivalent(rep, answer):
                ids.append(cid)
                break
        else:
            representatives.append(answer)
            ids.append(len(representatives) - 1)
    return ids


def majority_credit(clusters: Sequence[int], cluster_correct: dict[int, bool]) -> float:
    """Vote of one set of samples: the largest cluster wins; a tie gives the fraction of the tied
    clusters that are correct (E2 tie rule). The invalid cluster votes but is never correct."""
    counts: dict[int, int] = {}
    for cid in clusters:
        counts[cid] = counts.get(cid, 0) + 1
    top = max(counts.values())
    tied = [cid for cid, count in counts.items() if count == top]
    return sum(1.0 for cid in tied if cid != INVALID and cluster_correct.get(cid, False)) / len(tied)


def maj_at_k(
    clusters: Sequence[int],
    correct: Sequence[bool],
    k: int,
    *,
    max_enumeration: int = 10_000,
    monte_carlo_subsets: int = 1000,
    seed: int = 0,
) -> float:
    """maj@k of one problem (E2): expected vote credit over uniformly random k-subsets of its n samples.

    ``clusters`` from :func:`cluster_answers`; ``correct[i]`` is the verifier's verdict on sample i,
    and a cluster is correct when its first sample is (equivalent answers share a verdict). Exact
    enumeration when C(n,k) <= ``max_enumeration``, else ``monte_carlo_subsets`` seeded draws.
    """
    n = len(clusters)
    if len(correct) != n:
        raise ValueError(f"maj_at_k: {n} cluster ids but {len(correct)} correctness flags")
    if k < 1 or k > n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}")
    cluster_correct: dict[int, bool] = {}
    for cid, ok in zip(clusters, correct):
        cluster_correct.setdefault(int(cid), bool(ok) and cid != INVALID)
    if math.comb(n, k) <= max_enumeration:
        subsets: Any = itertools.combinations(range(n), k)
        total = math.comb(n, k)
    else:
        rng = random.Random(seed)
        subsets = (rng.sample(range(n), k) for _ in range(monte_carlo_subsets))
        total = monte_carlo_subsets
    return sum(majority_credit([clusters[i] for i in subset], cluster_correct) for subset in subsets) / total


# ----------------------------------------------------------------------------------------------
# E3. Calibration


def sequence_confidence(logp: Tensor, mask: Tensor) -> Tensor:
    """Confidence ``s(y) = (1/|y|) sum_t log pi(y_t | x, y_<t)`` per response (E3), [B,T] -> [B].

    An empty response gets confidence 0 (its mean is undefined; 0 keeps the batch NaN-free)."""
    mask = mask.to(logp.dtype)
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def confidence_auc(scores: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor) -> float | None:
    """ROC-AUC of confidence for separating correct from incorrect responses (E3):
    ``(1/(|P||N|)) sum_{i in P, j in N} [1(s_i > s_j) + 1/2 1(s_i = s_j)]``. None without both classes."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    ok = torch.as_tensor(correct).flatten().bool()
    if s.numel() != ok.numel():
        raise ValueError(f"confidence_auc: {s.numel()} scores but {ok.numel()} correctness flags")
    pos, neg = s[ok], s[~ok]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    wins = 0.0
    for chunk in pos.split(4096):  # bounded memory for large benchmarks
        diff = chunk[:, None] - neg[None, :]
        wins += float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
    return wins / (pos.numel() * neg.numel())


def per_question_auc(
    scores: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor, groups: Sequence[int] | Tensor
) -> float | None:
    """Confidence AUC within each question, averaged over questions with mixed outcomes (E3b)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    ok = torch.as_tensor(correct).flatten().bool()
    g = torch.as_tensor(groups).flatten()
    values = [confidence_auc(s[g == q], ok[g == q]) for q in torch.unique(g)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def precision_coverage(
    scores: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor
) -> list[tuple[float, float, float]]:
    """Selective prediction (E3): ``(threshold, coverage, precision)`` when answering only responses
    with confidence >= threshold, for every distinct score from the highest down."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    ok = torch.as_tensor(correct).flatten().double()
    if s.numel() == 0:
        return []
    curve = []
    for threshold in torch.unique(s).flip(0).tolist():
        kept = s >= threshold
        curve.append((threshold, float(kept.double().mean()), float(ok[kept].mean())))
    return curve


# ----------------------------------------------------------------------------------------------
# E4. Entropy


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``H_t = -sum_v p_v log p_v`` over the full vocabulary (E4), [..., V] -> [...].

    Logits are upcast to fp32 before the softmax (bf16 softmax loses ~1e-2 nats); temperature is
    applied, top-p/top-k truncation is not."""
    if temperature <= 0:
        raise ValueError(f"token_entropy needs temperature > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_stats(entropy: Tensor, mask: Tensor, *, top_fraction: float = 0.2) -> dict[str, float]:
    """Per-step entropy summary (E4) over response tokens only (mask 1).

    token_mean = sum(H*mask)/sum(mask); seq_mean = mean over non-empty responses of their token means;
    p10/p50/p90 percentiles; top_mean = mean of the top ``top_fraction`` highest-entropy tokens
    (the "forking tokens"). An empty mask gives zeros, never NaN."""
    mask = mask.bool()
    values = entropy.float()[mask]
    if values.numel() == 0:
        return {"token_mean": 0.0, "seq_mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0, "top_mean": 0.0}
    lengths = mask.sum(-1)
    per_seq = (entropy.float() * mask).sum(-1) / lengths.clamp(min=1)
    quantiles = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9]))
    top_count = max(1, math.ceil(top_fraction * values.numel()))
    return {
        "token_mean": float(values.mean()),
        "seq_mean": float(per_seq[lengths > 0].mean()),
        "p10": float(quantiles[0]),
        "p50": float(quantiles[1]),
        "p90": float(quantiles[2]),
        "top_mean": float(values.topk(top_count).values.mean()),
    }


# ----------------------------------------------------------------------------------------------
# E5. Effective rank of hidden states


def effective_rank(hidden: Tensor, *, center: bool = False) -> float:
    """Roy-Vetterli effective rank (E5): ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / sum_j sigma_j``,
    over the singular values of ``hidden`` [T,d]. Zero matrix -> 0."""
    if hidden.dim() != 2:
        raise ValueError(f"effective_rank needs a [T,d] matrix, got shape {tuple(hidden.shape)}")
    z = hidden.double()
    if center:
        z = z - z.mean(0, keepdim=True)
    sigma = torch.linalg.svdvals(z)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank_dynamics(
    hidden: Tensor, *, stride: int = 64, ema_decay: float = 0.9, center: bool = False
) -> dict[str, float]:
    """ER, ER velocity and ER acceleration of one response's hidden states [T,d] (E5, reconstructed).

    ER is evaluated on growing prefixes of length stride, 2*stride, ... <= T (just T when T < stride).
    ERV = mean of the EMA (decay ``ema_decay``, started at the first difference so a constant slope is
    not biased towards 0) of the first differences; ERA = mean of the second differences. Our choices:
    the EMA start and the prefix grid. With fewer than 2 (3) prefixes ERV (ERA) is 0."""
    if stride < 1:
        raise ValueError(f"effective_rank_dynamics needs stride >= 1, got {stride}")
    length = hidden.shape[0]
    ends = list(range(stride, length + 1, stride)) or [length]
    ranks = [effective_rank(hidden[:end], center=center) for end in ends]
    first = [b - a for a, b in zip(ranks, ranks[1:])]
    second = [b - a for a, b in zip(first, first[1:])]
    smoothed, ema = [], None
    for d in first:
        ema = d if ema is None else ema_decay * ema + (1 - ema_decay) * d
        smoothed.append(ema)
    return {
        "er": ranks[-1],
        "erv": sum(smoothed) / len(smoothed) if smoothed else 0.0,
        "era": sum(second) / len(second) if second else 0.0,
    }


def hidden_rank_stats(
    hidden: Tensor, mask: Tensor, correct: Sequence[bool] | Tensor | None = None, *, stride: int = 64
) -> dict[str, float]:
    """Mean ER/ERV/ERA over responses (E5), also split into correct/incorrect when ``correct`` is given.
    ``hidden`` [B,T,H]; only response tokens (mask 1) enter each response's matrix."""
    per_response = []
    for b in range(hidden.shape[0]):
        tokens = hidden[b][mask[b].bool()]
        per_response.append(effective_rank_dynamics(tokens, stride=stride) if tokens.shape[0] else None)
    flags = [None] * len(per_response) if correct is None else [bool(c) for c in torch.as_tensor(correct).tolist()]
    out: dict[str, float] = {}
    for suffix, keep in (("", lambda f: True), ("_correct", lambda f: f is True), ("_incorrect", lambda f: f is False)):
        chosen = [r for r, f in zip(per_response, flags) if r is not None and keep(f)]
        if not chosen or (suffix and correct is None):
            continue
        for key in ("er", "erv", "era"):
            out[key + suffix] = sum(r[key] for r in chosen) / len(chosen)
    return out


# ----------------------------------------------------------------------------------------------
# E6. Response length


def length_stats(
    mask: Tensor, truncated: Tensor | None = None, correct: Sequence[bool] | Tensor | None = None
) -> dict[str, float]:
    """Response length summary (E6). Lengths are ``mask.sum(-1)``: tokens the policy produced,
    EOS included, observation/padding tokens (mask 0) excluded.

    Keys: mean, median, p95, max, clip_ratio (fraction truncated), mean_correct, mean_incorrect
    (the last two only when that class is present)."""
    lengths = mask.float().sum(-1)
    if lengths.numel() == 0:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0.0, "clip_ratio": 0.0}
    out = {
        "mean": float(lengths.mean()),
        "median": float(torch.quantile(lengths, 0.5)),
        "p95": float(torch.quantile(lengths, 0.95)),
        "max": float(lengths.max()),
        "clip_ratio": float(truncated.float().mean()) if truncated is not None else 0.0,
    }
    if correct is not None:
        ok = torch.as_tensor(correct).flatten().bool()
        if ok.any():
            out["mean_correct"] = float(lengths[ok].mean())
        if (~ok).any():
            out["mean_incorrect"] = float(lengths[~ok].mean())
    return out


# ----------------------------------------------------------------------------------------------
# E7. Tool use


def tool_use_stats(
    tool_calls: Sequence[int],
    correct: Sequence[bool],
    *,
    first_call_position: Sequence[int | None] | None = None,
    tool_errors: Sequence[int] | None = None,
    turns: Sequence[int] | None = None,
) -> dict[str, float]:
    """Tool-use metrics over an evaluation set (E7), one entry per response.

    tool_productivity = #correct / #tool calls (D3; absent when no call was made); calls_per_question;
    calls_per_correct = mean calls over correct responses; tool_use_fraction; and, when given,
    mean first-call position (over responses that call), tool_error_rate (errors / calls), mean turns."""
    if len(tool_calls) != len(correct):
        raise ValueError(f"tool_use_stats: {len(tool_calls)} call counts but {len(correct)} correctness flags")
    if not tool_calls:
        return {}
    calls = [int(c) for c in tool_calls]
    ok = [bool(c) for c in correct]
    total_calls = sum(calls)
    out = {
        "calls_per_question": total_calls / len(calls),
        "tool_use_fraction": sum(c > 0 for c in calls) / len(calls),
    }
    if total_calls > 0:
        out["tool_productivity"] = sum(ok) / total_calls
    if any(ok):
        out["calls_per_correct"] = sum(c for c, f in zip(calls, ok) if f) / sum(ok)
    if first_call_position is not None:
        positions = [p for p in first_call_position if p is not None]
        if positions:
            out["first_call_position"] = sum(positions) / len(positions)
    if tool_errors is not None and total_calls > 0:
        out["tool_error_rate"] = sum(tool_errors) / total_calls
    if turns is not None:
        out["turns"] = sum(turns) / len(turns)
    return out
