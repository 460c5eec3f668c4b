"""Read a run folder (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/) and say how the run went:
the end-of-run summary, the curves PNG, and the samples of one step.

Pure functions over the files the loop writes, so the same code serves the summary printed when a run
ends (``RunLogger.close``), ``policylab show RUN_DIR`` and ``policylab samples RUN_DIR`` - on a finished
run and on one still being written. It lives on the train floor because the logger uses it; the arena's
plots (``eval/report.py``) share its matplotlib helpers and ``eval/summary.py`` its metrics reader.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CURVES_FILE = "curves.png"
# (metric, panel title) of the curves PNG; a panel whose metric the run never logged says "no data"
PANELS = [
    ("reward/mean", "train reward"),
    ("accuracy", "accuracy (train batches, held-out eval)"),
    ("entropy", "token entropy"),
    ("completion_length/mean", "completion length (tokens)"),
]


class NotARunError(ValueError):
    """The folder is not a policylab run folder (or one of its files cannot be read)."""


# ----------------------------------------------------------------------------------------------
# reading


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(records, torn): every JSON line of ``path``. A torn last line (a run still writing it, or killed
    mid-write) is skipped and reported as ``torn=True``; a bad line elsewhere is an error naming the line."""
    records, torn = [], False
    lines = path.read_text().splitlines()
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as err:
            if number == len(lines):
                torn = True
                break
            raise NotARunError(f"{path}:{number} is not valid JSON: {err}") from None
    return records, torn


def split_metrics(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines). A line with ``eval/`` keys is an evaluation (prefix removed,
    ``step`` kept); a line with any other metric is a training step."""
    steps, evals = [], []
    for line in records:
        ev = {k[len("eval/"):]: v for k, v in line.items() if k.startswith("eval/")}
        if ev:
            ev["step"] = line.get("step")
            evals.append(ev)
        if any(not k.startswith("eval/") and k != "step" for k in line):
            steps.append({k: v for k, v in line.items() if not k.startswith("eval/")})
    return steps, evals


@dataclass
class RunFiles:
    """What a run folder holds right now."""

    directory: Path
    total_steps: int | None  # train.steps of config.yaml
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    torn_metrics_line: bool = False
    checkpoint: Path | None = None  # the latest complete checkpoint

    @property
    def steps_done(self) -> int:
        return max((int(s.get("step", 0)) for s in self.steps), default=0)

    @property
    def checkpoint_step(self) -> int | None:
        return int(self.checkpoint.name.split("-")[1]) if self.checkpoint is not None else None

    def series(self, key: str, lines: list[dict] | None = None) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, skipping lines where it is absent or not finite."""
        xs, ys = [], []
        for line in self.steps if lines is None else lines:
            value = line.get(key)
            if _finite(value) and line.get("step") is not None:
                xs.append(float(line["step"]))
                ys.append(float(value))
        return xs, ys


def read_run(directory: str | Path) -> RunFiles:
    """Read a run folder; NotARunError names the folder and what is missing when it is not one."""
    from policylab.train import checkpoint

    directory = Path(directory)
    if not directory.is_dir():
        raise NotARunError(f"{directory} does not exist or is not a folder")
    config = directory / "config.yaml"
    if not config.exists():
        raise NotARunError(f"{directory} is not a policylab run folder: it has no config.yaml (a run folder holds "
                           "config.yaml, metrics.jsonl, samples.jsonl and checkpoints/)")
    try:
        raw = yaml.safe_load(config.read_text()) or {}
        total = (raw.get("train") or {}).get("steps")
    except (yaml.YAMLError, AttributeError) as err:
        raise NotARunError(f"{config} is not a readable recipe: {err}") from None
    run = RunFiles(directory, int(total) if isinstance(total, int) else None, checkpoint=checkpoint.latest(directory))
    metrics = directory / "metrics.jsonl"
    if metrics.exists():
        records, run.torn_metrics_line = read_jsonl(metrics)
        run.steps, run.evals = split_metrics(records)
    return run


def read_samples(directory: str | Path) -> dict[int, list[dict]]:
    """{step: [sample, ...]} from samples.jsonl (a torn last line is skipped)."""
    path = Path(directory) / "samples.jsonl"
    if not path.exists():
        raise NotARunError(f"{path} does not exist (no step has finished yet, or the run set train.log_samples=0)")
    by_step: dict[int, list[dict]] = {}
    for record in read_jsonl(path)[0]:
        by_step.setdefault(int(record.get("step", 0)), []).append(record)
    return by_step


# ----------------------------------------------------------------------------------------------
# the summary


def summarize(run: RunFiles, total_steps: int | None = None) -> dict[str, Any]:
    """The numbers of the end-of-run summary. ``total_steps`` overrides config.yaml's (the logger knows
    the total of the running recipe, which a resume may have raised)."""
    total = total_steps if total_steps is not None else run.total_steps
    done = run.steps_done
    out: dict[str, Any] = {"directory": str(run.directory), "steps_done": done, "total_steps": total,
                           "torn_metrics_line": run.torn_metrics_line}
    times = run.series("time/step_s")[1]
    out["mean_step_s"] = sum(times) / len(times) if times else None
    for suffix in ("", "_sampled"):
        points = [(e["step"], float(e[f"accuracy{suffix}"])) for e in run.evals if _finite(e.get(f"accuracy{suffix}"))]
        key = "eval" + suffix
        if points:
            best = max(points, key=lambda p: p[1])  # max keeps the first (earliest) of equal values
            out[key] = {"start": points[0][1], "start_step": points[0][0], "end": points[-1][1],
                        "end_step": points[-1][0], "best": best[1], "best_step": best[0], "count": len(points)}
        else:
            out[key] = None
    accuracy = run.series("accuracy")[1]
    if accuracy:  # the training batches' accuracy, averaged over the first and last tenth of the steps
        window = max(1, math.ceil(len(accuracy) / 10))
        out["train_accuracy"] = {"start": sum(accuracy[:window]) / window, "end": sum(accuracy[-window:]) / window,
                                 "window": window}
    else:
        out["train_accuracy"] = None
    finished = total is not None and run.checkpoint_step is not None and run.checkpoint_step >= total
    out["finished"] = finished
    out["checkpoint"] = str(run.checkpoint) if run.checkpoint is not None else None
    out["checkpoint_step"] = run.checkpoint_step
    files = [run.directory / name for name in ("metrics.jsonl", "samples.jsonl", CURVES_FILE)]
    out["files"] = [str(p) for p in files if p.exists()] + ([str(run.checkpoint)] if run.checkpoint else [])
    from policylab.train.interrupt import read_marker

    out["stopped"] = read_marker(run.directory)  # a graceful stop by a signal (train/interrupt.py)
    if finished:
        out["next"] = f"policylab eval {run.directory}"
    elif run.checkpoint is not None:
        out["next"] = f"policylab train --resume {run.directory}"
    else:
        out["next"] = None
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The summary as the lines printed at the end of a run and by ``policylab show``."""
    total = s["total_steps"] if s["total_steps"] is not None else "?"
    lines = [f"run {s['directory']}"]
    steps = f"{s['steps_done']} of {total}"
    if s["mean_step_s"] is not None:
        steps += f", {_seconds(s['mean_step_s'])} s/step on average"
    lines.append(f"  steps           {steps}")
    for key, label in (("eval", "greedy"), ("eval_sampled", "sampled")):
        e = s[key]
        if e is None:
            continue
        lines.append(f"  eval accuracy   {e['start']:.3f} -> {e['end']:.3f} {label} (step {e['start_step']} -> "
                     f"{e['end_step']}; best {e['best']:.3f} at step {e['best_step']})")
    if s["eval"] is None:
        lines.append("  eval accuracy   none logged yet (train.eval_size=0, or no evaluation has finished)")
    t = s["train_accuracy"]
    if t is not None:
        span = f"mean of the first/last {t['window']} steps" if t["window"] > 1 else "first/last step"
        lines.append(f"  train accuracy  {t['start']:.3f} -> {t['end']:.3f} ({span})")
    if s["torn_metrics_line"]:
        lines.append("  note            skipped the unfinished last line of metrics.jsonl (the run is writing it)")
    for n, path in enumerate(s["files"]):
        lines.append(f"  {'files' if n == 0 else '':<16}{path}")
    if s["finished"]:
        lines.append(f"  finished; evaluate the final checkpoint with: {s['next']}")
    elif s.get("stopped") and s["next"]:  # the loop prints the resume command as the run's last line
        lines.append(f"  stopped by {s['stopped']['signal']} at step {s['stopped']['step']}")
    elif s["next"]:
        lines.append(f"  not finished (still running, or stopped); continue from step {s['checkpoint_step']} with: "
                     f"{s['next']}")
    else:
        lines.append("  not finished, and no checkpoint was written yet, so there is nothing to resume")
    if any(path.endswith("samples.jsonl") for path in s["files"]):
        lines.append(f"  read the completions with: policylab samples {s['directory']} --step N")
    return "\n".join(lines)


def eta_seconds(remaining_steps: int, step_times: list[float]) -> float | None:
    """Seconds left: remaining steps x the mean training step time so far (evaluations not counted)."""
    times = [t for t in step_times if _finite(t)]
    if remaining_steps <= 0:
        return 0.0
    return remaining_steps * sum(times) / len(times) if times else None


def format_duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=int(round(seconds))))


# ----------------------------------------------------------------------------------------------
# the curves (matplotlib helpers shared with the arena's plots in eval/report.py)


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average; the window shrinks at both ends so every point keeps its own step."""
    if window <= 1:
        return list(values)
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - half) : i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def smoothing_window(num_steps: int) -> int:
    """Per-step RL metrics of small batches are noisy: average over ~1/10 of the run (odd, >= 1)."""
    window = max(1, num_steps // 10)
    return window if window % 2 else window + 1


def plot_curves(run: RunFiles, path: str | Path | None = None) -> Path:
    """Write the run's curves (one PNG, a panel per PANELS metric) and return its path. Written under a
    temporary name and renamed, so a viewer never sees a half-written file while the run refreshes it."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path) if path is not None else run.directory / CURVES_FILE
    window = smoothing_window(len(run.steps))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), dpi=100)
    for ax, (key, title) in zip(axes.flat, PANELS):
        xs, ys = run.series(key)
        drawn = bool(xs)
        if xs:
            if window > 1:  # the raw values, faint, so the smoothing hides nothing
                ax.plot(xs, ys, color="C0", linewidth=0.6, alpha=0.35)
            ax.plot(xs, smooth(ys, window), color="C0", linewidth=1.6, label="train")
        if key == "accuracy":
            for suffix, style, label in (("", "o-", "eval greedy"), ("_sampled", "s--", "eval sampled")):
                ex, ey = run.series(f"accuracy{suffix}", run.evals)
                if ex:
                    ax.plot(ex, ey, style, markersize=5, color="C1" if not suffix else "C2", label=label)
                    drawn = True
            if drawn:
                ax.legend(fontsize=8)
        suffix = f" ({window}-step moving average)" if window > 1 and xs else ""
        ax.set_title(title + suffix if drawn else f"{title} (no data)", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    done = f"{run.steps_done} of {run.total_steps}" if run.total_steps is not None else str(run.steps_done)
    fig.suptitle(f"{run.directory.name}: {done} steps", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def report(directory: str | Path, total_steps: int | None = None) -> str:
    """Refresh the curves PNG of a run folder and return its summary text (what ``policylab show`` prints)."""
    run = read_run(directory)
    plot_curves(run)
    return format_summary(summarize(run, total_steps))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"
