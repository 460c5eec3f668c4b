"""Read finished arena runs and reduce them to per-recipe means with 95% t-intervals over seeds, and
the difference of every recipe to the first one (paired by seed).

A run folder holds the loop's ``metrics.jsonl`` (one JSON object per step; evaluation lines carry
``eval/...`` keys; the loop's ``eval/accuracy`` is greedy) and, when the arena evaluated the final model
itself, ``eval.json`` (the dict :func:`policylab.eval.evaluate.evaluate` returns, with pass@k).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policylab.eval.stats import Interval, difference_ci, mean_ci, verdict
from policylab.train.run_report import read_jsonl, split_metrics  # one reader for run folders

# (key in the summary, label in the report); held-out numbers first, then training dynamics and cost
TABLE_METRICS = [
    ("heldout_accuracy", "held-out accuracy (greedy)"),
    ("pass@1", "pass@1"),
    ("pass@k", "pass@k"),
    ("train_reward", "train reward (last 20%)"),
    ("entropy", "entropy (last 20%)"),
    ("completion_length", "length (last 20%)"),
    ("s_per_step", "s/step (median)"),
    ("cpu_s_per_step", "CPU s/step (median)"),
]
# the metric each comparison's one-line verdict is about: the first of these the runs have
HEADLINE_METRICS = [("heldout_accuracy", "held-out accuracy"), ("pass@1", "pass@1"), ("train_reward", "train reward")]
STEP_KEYS = ("reward/mean", "accuracy", "entropy", "completion_length/mean", "time/step_s")
_PASS_KEY = re.compile(r"^pass@(\d+)$")


@dataclass
class RunRecord:
    """One finished (or missing) run: its step series, its evaluations and the final numbers."""

    label: str
    recipe: str
    seed: int
    directory: Path
    status: str  # "done", "failed", "missing"
    steps: list[dict[str, Any]] = field(default_factory=list)  # training lines
    evals: list[dict[str, Any]] = field(default_factory=list)  # the loop's eval lines, 'eval/' prefix removed
    arena_eval: dict[str, Any] = field(default_factory=dict)  # eval.json: the arena's own evaluation
    error: str = ""

    @property
    def loop_eval(self) -> dict[str, Any]:
        """The loop's last evaluation (greedy accuracy on its held-out rows)."""
        return self.evals[-1] if self.evals else {}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(step, value) pairs of a training metric, skipping steps where it is absent or not finite."""
        xs, ys = [], []
        for i, line in enumerate(self.steps):
            value = line.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(float(line.get("step", i + 1)))
                ys.append(float(value))
        return xs, ys

    def wall_clock(self) -> list[float]:
        """Cumulative seconds at the end of each training step (from ``time/step_s``)."""
        total, out = 0.0, []
        for line in self.steps:
            value = line.get("time/step_s")
            total += float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
            out.append(total)
        return out

    def pass_curve(self) -> dict[int, float]:
        """{k: pass@k} of the final model: the arena's evaluation, else the loop's if it logged pass@k."""
        for source in (self.arena_eval, self.loop_eval):
            curve = {int(m.group(1)): float(v) for key, v in source.items()
                     if (m := _PASS_KEY.match(key)) and isinstance(v, (int, float))}
            if curve:
                return curve
        return {}

    def heldout_accuracy(self) -> float | None:
        """Greedy accuracy of the final model on held-out prompts (the arena's evaluation, else the loop's)."""
        value = _number(self.arena_eval.get("greedy_accuracy"))
        return value if value is not None else _number(self.loop_eval.get("accuracy"))

    def final(self) -> dict[str, float | None]:
        """The numbers of one run that the arena table aggregates over seeds."""
        curve = self.pass_curve()
        tail = max(1, math.ceil(0.2 * len(self.steps)))
        return {
            "heldout_accuracy": self.heldout_accuracy(),
            "pass@1": curve.get(1),
            "pass@k": curve[max(curve)] if curve else None,
            "k": max(curve) if curve else None,
            "train_reward": _tail_mean(self.series("reward/mean")[1], tail),
            "entropy": _tail_mean(self.series("entropy")[1], tail),
            "completion_length": _tail_mean(self.series("completion_length/mean")[1], tail),
            # medians: one slow step (another job on the machine, a checkpoint) must not make a recipe look slow
            "s_per_step": _median(self.series("time/step_s")[1]),
            "cpu_s_per_step": _median(self.series("time/step_cpu_s")[1]),
            "wall_clock_s": self.wall_clock()[-1] if self.steps else None,
        }


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _tail_mean(values: list[float], count: int) -> float | None:
    tail = values[-count:] if values else []
    return sum(tail) / len(tail) if tail else None


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a metrics.jsonl (``eval/`` prefix removed from evaluations).
    A torn last line (the run was killed mid-write) is skipped; a bad line elsewhere is an error."""
    return split_metrics(read_jsonl(path)[0])


def read_run(label: str, recipe: str, seed: int, directory: Path) -> RunRecord:
    status = "done" if (directory / "DONE").exists() else ("failed" if (directory / "FAILED").exists() else "missing")
    record = RunRecord(label, recipe, seed, directory, status)
    if status == "failed":
        record.error = (directory / "FAILED").read_text()[-2000:]
    metrics = directory / "metrics.jsonl"
    if metrics.exists():
        record.steps, record.evals = read_metrics(metrics)
    if (directory / "eval.json").exists():
        record.arena_eval = json.loads((directory / "eval.json").read_text())
    return record


def _as_dict(interval: Interval | None) -> dict | None:
    return interval.as_dict() if interval is not None else None


def summarize(runs: list[RunRecord], labels: list[str]) -> dict[str, Any]:
    """Per-recipe mean ± 95% t-interval over seeds of every table metric, and per-recipe differences
    to ``labels[0]`` (paired over shared seeds; Welch otherwise). Only runs with status 'done' count."""
    done = [r for r in runs if r.status == "done"]
    finals = {(r.label, r.seed): r.final() for r in done}
    per_recipe: dict[str, dict[str, Any]] = {}
    for label in labels:
        seeds = sorted(seed for (lab, seed) in finals if lab == label)
        entry: dict[str, Any] = {"seeds": seeds}
        for key, _ in TABLE_METRICS + [("wall_clock_s", "")]:
            entry[key] = _as_dict(mean_ci([finals[(label, s)][key] for s in seeds]))
        ks = [finals[(label, s)]["k"] for s in seeds if finals[(label, s)]["k"] is not None]
        entry["k"] = max(ks) if ks else None
        entry["pass_curve"] = _pass_curve_summary([r for r in done if r.label == label])
        per_recipe[label] = entry
    baseline = labels[0] if labels else None
    differences: dict[str, dict[str, Any]] = {}
    for label in labels[1:]:
        differences[label] = {}
        for key, _ in TABLE_METRICS:
            treat = {s: finals[(label, s)][key] for (lab, s) in finals if lab == label}
            base = {s: finals[(baseline, s)][key] for (lab, s) in finals if lab == baseline}
            interval, method = difference_ci(treat, base)
            differences[label][key] = None if interval is None else {**interval.as_dict(), "method": method}
    out = {
        "baseline": baseline,
        "recipes": per_recipe,
        "differences": differences,
        "runs": [
            {"label": r.label, "recipe": r.recipe, "seed": r.seed, "dir": str(r.directory), "status": r.status,
             "steps": len(r.steps), "final": finals.get((r.label, r.seed)), "error": r.error or None}
            for r in runs
        ],
    }
    out["headlines"] = headlines(out)
    return out


def headlines(summary: dict[str, Any]) -> list[str]:
    """One line in words per comparison with the baseline, on the first metric of HEADLINE_METRICS that
    both have: 'dapo vs grpo: no difference in held-out accuracy beyond noise (+0.000 ± 0.043, 3 seeds)'."""
    lines = []
    base = summary.get("baseline")
    for label, entry in summary.get("differences", {}).items():
        found = next(((key, name) for key, name in HEADLINE_METRICS if entry.get(key)), None)
        if found is None:
            lines.append(f"{label} vs {base}: no finished runs to compare")
            continue
        key, name = found
        d = entry[key]
        v = verdict(Interval(d["mean"], d["ci95"], d["n"]))
        if v.kind in ("higher", "lower"):
            lines.append(f"{label} vs {base}: {v.kind} {name} ({v.text})")
        elif v.kind == "no difference":
            lines.append(f"{label} vs {base}: no difference in {name} beyond noise ({v.text})")
        else:
            lines.append(f"{label} vs {base}: inconclusive on {name}: {v.text}")
    return lines


def _pass_curve_summary(runs: list[RunRecord]) -> dict[str, dict | None]:
    curves = [r.pass_curve() for r in runs]
    ks = sorted({k for c in curves for k in c})
    return {str(k): _as_dict(mean_ci([c[k] for c in curves if k in c])) for k in ks}
