"""Confidence intervals for comparing runs: t-intervals over seeds and bootstrap over problems.

Arena tables report ``mean ± half-width`` of a 95% Student-t interval over seeds, and the difference
of each recipe to the first one (paired by seed when both ran the same seeds, Welch otherwise).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import mpmath  # a dependency of sympy; gives the regularised incomplete beta for the t CDF


def t_cdf(t: float, df: float) -> float:
    """Student-t CDF: ``1 - I_{df/(df+t^2)}(df/2, 1/2) / 2`` for t >= 0, by symmetry below 0."""
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    tail = 0.5 * float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse Student-t CDF by bisection on :func:`t_cdf` (monotone), to ~1e-10."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval; ``half_width`` is None when it cannot be estimated (n < 2)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.half_width, "low": self.low, "high": self.high, "n": self.n}


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval | None:
    """Mean ± t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` (sample std, ddof=1).
    Non-finite and None values are dropped; None when nothing is left."""
    xs = _finite(values)
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n), n)


def difference_ci(
    treatment: dict[int, float], baseline: dict[int, float], confidence: float = 0.95
) -> tuple[Interval | None, str]:
    """Mean difference ``treatment - baseline`` with its t-interval, and the method used.

    Both map seed -> value. When the two share at least two seeds (or ran exactly the same single seed)
    the difference is paired over the shared seeds (same seed = same data order and start weights, so
    pairing removes that variance); otherwise a Welch interval over all values of each."""
    t = {s: float(v) for s, v in treatment.items() if v is not None and math.isfinite(float(v))}
    b = {s: float(v) for s, v in baseline.items() if v is not None and math.isfinite(float(v))}
    shared = sorted(set(t) & set(b))
    if len(shared) >= 2 or (shared and set(t) == set(b)):
        return mean_ci([t[s] - b[s] for s in shared], confidence), "paired"
    if not t or not b:
        return None, "none"
    xs, ys = list(t.values()), list(b.values())
    diff = sum(xs) / len(xs) - sum(ys) / len(ys)
    if len(xs) < 2 or len(ys) < 2:
        return Interval(diff, None, min(len(xs), len(ys))), "welch"
    vx = sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1) / len(xs)
    vy = sum((y - sum(ys) / len(ys)) ** 2 for y in ys) / (len(ys) - 1) / len(ys)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Interval(diff, 0.0, min(len(xs), len(ys))), "welch"
    df = (vx + vy) ** 2 / (vx**2 / (len(xs) - 1) + vy**2 / (len(ys) - 1))  # Welch-Satterthwaite
    return Interval(diff, t_quantile((1 + confidence) / 2, df) * se, min(len(xs), len(ys))), "welch"


@dataclass(frozen=True)
class Verdict:
    """What a difference interval says, in words: ``kind`` is 'higher', 'lower', 'no difference',
    'identical' (every seed gave the same difference, so the t-interval has zero width) or 'one seed'
    (no interval); ``significant`` only for 'higher'/'lower'."""

    kind: str
    significant: bool
    text: str


def verdict(interval: Interval | None, *, min_identical_n: int = 5) -> Verdict:
    """Classify a difference interval. A zero-width interval comes from seeds that gave identical
    differences, not from certainty: with fewer than ``min_identical_n`` seeds it is inconclusive (a few
    seeds on a small held-out set easily tie), from that many on its sign counts as a difference."""
    if interval is None:
        return Verdict("none", False, "no data")
    if interval.half_width is None:
        return Verdict("one seed", False, f"one seed, no interval ({interval.mean:+.3f})")
    if interval.half_width <= 1e-9 * max(1.0, abs(interval.mean)):  # ties up to float round-off (0.8-0.7 vs 0.6-0.5)
        if interval.n < min_identical_n or interval.mean == 0:
            return Verdict("identical", False, f"identical across seeds ({interval.mean:+.3f}, {interval.n} seeds; "
                                               f"inconclusive below {min_identical_n})")
        kind = "higher" if interval.mean > 0 else "lower"
        return Verdict(kind, True, f"{interval.mean:+.3f}, identical across {interval.n} seeds")
    text = f"{interval.mean:+.3f} ± {interval.half_width:.3f}, {interval.n} seeds"
    if interval.low > 0:
        return Verdict("higher", True, text)
    if interval.high < 0:
        return Verdict("lower", True, text)
    return Verdict("no difference", False, text)


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over problems (E1 rule: 1000 resamples)."""
    xs = _finite(values)
    if not xs:
        raise ValueError("bootstrap_ci needs at least one finite value")
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(resamples))
    alpha = (1 - confidence) / 2
    lo = means[max(0, math.floor(alpha * resamples))]
    hi = means[min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)]
    return lo, hi
