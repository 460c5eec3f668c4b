"""MMR1 Variance-Aware Sampling (arXiv:2509.21268): draw prompts whose rollouts are expected to disagree more
often, mixed with uniform draws to keep coverage.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Sequence

import torch

from policylab.registry import register

# -- scores ----------------------------------------------------------------------------------------------


def outcome_variance_score(pass_rate: float) -> float:
    """OVS = p(1 − p), the Bernoulli variance of the outcome (learnability)."""
    return pass_rate * (1.0 - pass_rate)


def _ngrams(seq: Sequence[int], n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int = 3) -> float:
    """Unique n-grams / total n-grams over all of a prompt's rollouts (0 when there is no n-gram)."""
    grams = [g for s in seqs for g in _ngrams(list(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu_123(candidate: Sequence[int], references: Sequence[Sequence[int]]) -> float:
    """Sentence BLEU with uniform 1-,2-,3-gram weights, add-one smoothing for n > 1 and brevity penalty."""
    if not candidate or not references:
        return 0.0
    log_p = 0.0
    for n in (1, 2, 3):
        cand = Counter(_ngrams(list(candidate), n))
        max_ref: Counter = Counter()
        for ref in references:
            for g, c in Counter(_ngrams(list(ref), n)).items():
                max_ref[g] = max(max_ref[g], c)
        matches = sum(min(c, max_ref[g]) for g, c in cand.items())
        total = sum(cand.values())
        smooth = 0 if n == 1 else 1
        if total + smooth == 0 or matches + smooth == 0:
            return 0.0
        log_p += math.log((matches + smooth) / (total + smooth)) / 3
    closest = min((len(r) for r in references), key=lambda r: (abs(r - len(candidate)), r))
    brevity = 1.0 if len(candidate) > closest else math.exp(1 - closest / max(1, len(candidate)))
    return brevity * math.exp(log_p)


def self_bleu_diversity(seqs: Sequence[Sequence[int]]) -> float:
    """1 − mean_i BLEU-123(y_i; the other rollouts): higher = more diverse."""
    if len(seqs) < 2:
        return 0.0
    scores = [bleu_123(seqs[i], [s for j, s in enumerate(seqs) if j != i]) for i in range(len(seqs))]
    return 1.0 - sum(scores) / len(scores)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_distance_diversity(seqs: Sequence[Sequence[int]]) -> float:
    """Mean pairwise Levenshtein distance over token ids, each normalised by the longer length (in [0, 1])."""
    pairs = [(a, b) for i, a in enumerate(seqs) for b in seqs[i + 1 :]]
    if not pairs:
        return 0.0
    return sum(edit_distance(a, b) / max(1, len(a), len(b)) for a, b in pairs) / len(pairs)


DIVERSITY = {"distinct_n": distinct_n, "self_bleu": self_bleu_diversity, "edit_distance": edit_distance_diversity}
METRICS = ("learnability", *DIVERSITY)


@register("sampler", "vas", spec="arXiv:2509.21268 (Variance-Aware Sampling)")
class VarianceAwareSampler:
    """VAS (MMR1, arXiv:2509.21268): each batch draws ⌊λ·n⌋ prompts with replacement ∝ w(VPS) and the rest
    uniformly (a shuffled permutation walked with wrap-around), interleaved.

    VPS(x) = Σ_m weight_m·metric_m(x) over ``metrics`` ("learnability" = p(1 − p), the outcome variance;
    "distinct_n", "self_bleu", "edit_distance" for trajectory diversity), min–max normalised over the dataset
    and blended with the old weights by ``momentum``, refreshed every ``update_freq`` steps (``after_step``).
    Pass rates come from the loop's ``update({"index": [...], "pass_rate": [...]})`` after each generation
    round; ``annotate`` (an internal-state refresh: it provides no field) also reads pass rates and the
    diversity of this step's prompts from their rollouts (group ids map to the order of ``next_batch``
    indices, as the engines number groups). MMR1's separate scoring pass over the whole dataset is not run.
    Prompts never seen count as pass rate ``unseen_pass_rate`` and diversity 0. While all weights are 0 the
    weighted part draws uniformly.
    """

    requires = ("rewards", "reward_components", "completion_ids", "completion_mask", "group")
    provides = ()

    def __init__(self, mixture_ratio: float = 0.5, update_freq: int = 4, metrics: Sequence[str] = ("learnability",),
                 weights: Sequence[float] = (1.0,), momentum: float = 0.0, unseen_pass_rate: float = 0.5, seed: int = 0):
        if not 0.0 <= mixture_ratio <= 1.0:
            raise ValueError(f"vas mixture_ratio must be in [0, 1], got {mixture_ratio}")
        if len(metrics) != len(weights):
            raise ValueError(f"vas needs one weight per metric, got {len(metrics)} metrics and {len(weights)} weights")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"vas metrics {unknown} unknown; valid: {METRICS}")
        if update_freq < 1:
            raise ValueError(f"vas update_freq must be >= 1, got {update_freq}")
        self.mixture_ratio, self.update_freq, self.metrics, self.metric_weights = mixture_ratio, update_freq, list(metrics), list(weights)
        self.momentum, self.unseen_pass_rate, self.seed = momentum, unseen_pass_rate, seed
        self.size = 0
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0
        self.weights: list[float] = []
        self.pass_rate: dict[int, float] = {}
        self.diversity: dict[int, dict[str, float]] = {}
        self.steps = 0
        self.pending: list[int] = []
        self.last_sources: list[str] = []

    # -- protocol -----------------------------------------------------------------------------------------
    def bind(self, dataset_size: int, seed: int | None = None) -> None:
        if dataset_size <= 0:
            raise ValueError("the training split is empty: no prompts to sample")
        self.size = dataset_size
        if seed is not None:
            self.seed = seed
        self.rng = random.Random(self.seed)
        self.order = self._permutation()
        self.position = 0
        self.weights = [0.0] * dataset_size
        self.refresh()

    def _permutation(self) -> list[int]:
        order = list(range(self.size))
        self.rng.shuffle(order)
        return order

    def _uniform(self) -> int:
        if self.position >= self.size:
            self.order, self.position = self._permutation(), 0
        self.position += 1
        return self.order[self.position - 1]

    def next_batch(self, n: int) -> list[int]:
        if self.size == 0:
            raise ValueError("vas sampler used before bind(dataset_size)")
        n_weighted = int(math.floor(self.mixture_ratio * n))
        if sum(self.weights) > 0 and n_weighted:
            weighted = self.rng.choices(range(self.size), weights=self.weights, k=n_weighted)
        else:
            weighted = [self._uniform() for _ in range(n_weighted)]
        uniform = [self._uniform() for _ in range(n - n_weighted)]
        out, sources = [], []
        for k in range(max(len(weighted), len(uniform))):  # interleave the two parts
            if k < len(weighted):
                out.append(weighted[k])
                sources.append("weighted")
            if k < len(uniform):
                out.append(uniform[k])
                sources.append("uniform")
        self.last_sources = sources
        self.pending.extend(out)
        return out

    def update(self, stats: dict) -> None:
        """Record per-prompt statistics: ``index``, ``pass_rate`` and optionally ``diversity`` (dicts by metric)."""
        if "index" not in stats or "pass_rate" not in stats:
            raise ValueError("vas update(stats) needs 'index' and 'pass_rate' lists")
        diversity = stats.get("diversity") or [None] * len(stats["index"])
        for i, p, d in zip(stats["index"], stats["pass_rate"], diversity):
            self.pass_rate[int(i)] = float(p)
            if d is not None:
                self.diversity[int(i)] = dict(d)

    def annotate(self, rollouts, ctx=None) -> dict:
        """Learn pass rates and diversity of this step's prompts from their rollouts; provides no field."""
        correct = rollouts.reward_components.get("accuracy")
        if correct is None:
            correct = (torch.nan_to_num(rollouts.rewards.float(), nan=0.0) > 0).float()
        correct = torch.nan_to_num(correct.float(), nan=0.0)
        index, rates, div = [], [], []
        for g in torch.unique(rollouts.group).tolist():
            if not 0 <= g < len(self.pending):
                continue
            rows = (rollouts.group == g).nonzero().flatten()
            seqs = [rollouts.completion_ids[i][rollouts.completion_mask[i] > 0].tolist() for i in rows.tolist()]
            index.append(self.pending[g])
            rates.append(float(correct[rows].mean()))
            div.append({name: fn(seqs) for name, fn in DIVERSITY.items() if name in self.metrics})
        self.update({"index": index, "pass_rate": rates, "diversity": div})
        return {}

    def after_step(self, metrics: dict | None = None) -> None:
        """One training step done: forget this step's draws and refresh the weights every ``update_freq`` steps."""
        self.pending = []
        self.steps += 1
        if self.steps % self.update_freq == 0:
            self.refresh()

    # -- weights ----------------------------------------------------------------------------------------------
    def vps(self, i: int) -> float:
        p = self.pass_rate.get(i, self.unseen_pass_rate)
        d = self.diversity.get(i, {})
        total = 0.0
        for name, w in zip(self.metrics, self.metric_weights):
            total += w * (outcome_variance_score(p) if name == "learnability" else d.get(name, 0.0))
        return total

    def refresh(self) -> None:
        scores = [self.vps(i) for i in range(self.size)]
        lo, hi = min(scores), max(scores)
        new = [(s - lo) / (hi - lo + 1e-8) for s in scores]
        self.weights = [self.momentum * old + (1 - self.momentum) * w for old, w in zip(self.weights, new)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "size": self.size, "rng": self.rng.getstate(), "order": list(self.order),
                "position": self.position, "weights": list(self.weights), "pass_rate": dict(self.pass_rate),
                "diversity": {k: dict(v) for k, v in self.diversity.items()}, "steps": self.steps, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.size, self.position, self.steps = state["seed"], state["size"], state["position"], state["steps"]
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.order, self.weights, self.pending = list(state["order"]), list(state["weights"]), list(state["pending"])
        self.pass_rate = {int(k): v for k, v in state["pass_rate"].items()}
        self.diversity = {int(k): dict(v) for k, v in state["diversity"].items()}


def _as_rng_state(state):
    """random.Random state as setstate wants it (tuples), also after a JSON/YAML round trip made lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
