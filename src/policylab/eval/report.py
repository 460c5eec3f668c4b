"""Arena plots (matplotlib, Agg backend) and the self-contained ``report.html``.

Curves show the mean over seeds with the min-max band across seeds; the table shows mean ± 95%
t-interval half-width over seeds, and the difference of each recipe to the first one.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from policylab.eval.stats import Interval, verdict
from policylab.eval.summary import TABLE_METRICS, RunRecord
# the matplotlib helpers live with the single-run curves (train floor), so both plots share them
from policylab.train.run_report import pyplot as _pyplot
from policylab.train.run_report import smooth, smoothing_window  # noqa: F401 (smooth: part of this module's API)

# (file stem, title, y metric, x axis) for the training curves
CURVES = [
    ("reward_vs_step", "Train reward vs step", "reward/mean", "step"),
    ("reward_vs_time", "Train reward vs wall-clock", "reward/mean", "time"),
    ("accuracy_vs_step", "Accuracy vs step (dots: held-out)", "accuracy", "step"),
    ("accuracy_vs_time", "Train accuracy vs wall-clock", "accuracy", "time"),
    ("entropy_vs_step", "Token entropy vs step", "entropy", "step"),
    ("length_vs_step", "Completion length vs step", "completion_length/mean", "step"),
]


def _mean_band(runs: list[RunRecord], key: str, axis: str, window: int = 1):
    """x, mean, low, high over the seeds of one recipe, aligned by step index (same budget per seed);
    each seed's series is smoothed with ``window`` first, so the band shows seed spread, not step noise."""
    series = []
    for run in runs:
        times = run.wall_clock()
        points = {}
        for i, line in enumerate(run.steps):
            value = line.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                x = float(line.get("step", i + 1)) if axis == "step" else times[i]
                points[i] = (x, float(value))
        smoothed = smooth([y for _, y in points.values()], window)
        series.append({i: (x, y) for (i, (x, _)), y in zip(points.items(), smoothed)})
    indices = sorted(set().union(*[set(p) for p in series])) if series else []
    xs, mean, low, high = [], [], [], []
    for i in indices:
        found = [p[i] for p in series if i in p]
        ys = [y for _, y in found]
        xs.append(sum(x for x, _ in found) / len(found))
        mean.append(sum(ys) / len(ys))
        low.append(min(ys))
        high.append(max(ys))
    return xs, mean, low, high


def make_plots(runs: list[RunRecord], labels: list[str], out_dir: Path,
               start_curve: dict[int, float] | None = None) -> dict[str, Path]:
    """Write every plot as PNG into ``out_dir``; returns {stem: path}. Curves with no data anywhere
    are still drawn (empty, titled 'no data') so the report always has the same sections.
    ``start_curve`` ({k: pass@k} of the shared start model) is drawn dashed on the pass@k plot."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    done = [r for r in runs if r.status == "done"]
    paths: dict[str, Path] = {}
    window = smoothing_window(max((len(r.steps) for r in done), default=0))
    for stem, title, key, axis in CURVES:
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
        drawn = False
        for n, label in enumerate(labels):
            mine = [r for r in done if r.label == label]
            xs, mean, low, high = _mean_band(mine, key, axis, window)
            if not xs:
                continue
            color = colors[n % len(colors)]
            if window > 1:  # the unsmoothed mean, faint, so the smoothing hides nothing
                raw_x, raw_mean, _, _ = _mean_band(mine, key, axis)
                ax.plot(raw_x, raw_mean, color=color, linewidth=0.6, alpha=0.3)
            ax.plot(xs, mean, label=f"{label} (n={len(mine)})", color=color, linewidth=1.6)
            if len(mine) > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
            if key == "accuracy" and axis == "step":
                ex, ey = _eval_points(mine)
                if ex:
                    ax.plot(ex, ey, "o", color=color, markersize=5)
            drawn = True
        suffix = f", {window}-step moving average" if window > 1 and drawn else ""
        ax.set_title(title + suffix if drawn else title + " (no data)", fontsize=11)
        ax.set_xlabel("step" if axis == "step" else "wall-clock seconds")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths[stem] = out_dir / f"{stem}.png"
        fig.savefig(paths[stem])
        plt.close(fig)
    paths["pass_at_k"] = _pass_at_k_plot(plt, done, labels, colors, out_dir / "pass_at_k.png", start_curve)
    return paths


def _eval_points(runs: list[RunRecord]) -> tuple[list[float], list[float]]:
    """Held-out greedy accuracy per evaluated step, averaged over the seeds that evaluated at that step:
    the loop's eval lines, and the arena's final evaluation at the last step."""
    by_step: dict[float, list[float]] = {}
    for run in runs:
        points = [(ev.get("step"), ev.get("accuracy")) for ev in run.evals]
        if run.arena_eval and run.steps:
            points = [p for p in points if p[0] != run.steps[-1].get("step")]
            points.append((run.steps[-1].get("step", len(run.steps)), run.arena_eval.get("greedy_accuracy")))
        for step, accuracy in points:
            if isinstance(accuracy, (int, float)) and step is not None:
                by_step.setdefault(float(step), []).append(float(accuracy))
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _pass_at_k_plot(plt, runs, labels, colors, path: Path, start_curve: dict[int, float] | None) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    drawn = False
    if start_curve:
        ks = sorted(start_curve)
        ax.plot(ks, [start_curve[k] for k in ks], "--", color="gray", label="start model")
    for n, label in enumerate(labels):
        curves = [r.pass_curve() for r in runs if r.label == label]
        ks = sorted({k for c in curves for k in c})
        if not ks:
            continue
        means = [sum(c[k] for c in curves if k in c) / sum(k in c for c in curves) for k in ks]
        lows = [min(c[k] for c in curves if k in c) for k in ks]
        highs = [max(c[k] for c in curves if k in c) for k in ks]
        color = colors[n % len(colors)]
        ax.plot(ks, means, "o-", label=label, color=color)
        if len(curves) > 1:
            ax.fill_between(ks, lows, highs, color=color, alpha=0.15, linewidth=0)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ks_all = sorted({k for r in runs for k in r.pass_curve()} | set(start_curve or {}))
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.legend(fontsize=8)
    ax.set_title("Held-out pass@k (final model)" + ("" if drawn else " (no data)"))
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# HTML


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(entry: dict | None, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "<td class='na'>–</td>"
    mean = entry["mean"]
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    if entry.get("ci95") is not None:
        text += f" ± {entry['ci95']:.3f}"
        if signed:
            v = verdict(Interval(mean, entry["ci95"], entry.get("n", 0)))
            if v.significant:
                text = f"<b>{text}</b>"  # the interval excludes 0
            elif v.kind == "identical":
                text += " (identical across seeds)"  # zero width from ties, not certainty
    return f"<td>{text}</td>"


def write_html(path: Path, spec: dict[str, Any], summary: dict[str, Any], plots: dict[str, Path],
               descriptions: dict[str, str] | None = None) -> Path:
    """The report: settings, the mean ± CI table, the differences table, every plot inlined as a base64
    PNG (so the file is self-contained), and the list of runs."""
    esc = html.escape
    labels = list(summary["recipes"])
    descriptions = descriptions or {}
    k_values = {summary["recipes"][lab].get("k") for lab in labels} - {None}
    k_max = max(k_values) if k_values else None
    header = "".join(f"<th>{esc(f'pass@{k_max}' if key == 'pass@k' and k_max else name)}</th>"
                     for key, name in TABLE_METRICS)
    rows = []
    for label in labels:
        entry = summary["recipes"][label]
        cells = "".join(_cell(entry.get(key)) for key, _ in TABLE_METRICS)
        desc = esc(descriptions.get(label, ""))
        rows.append(f"<tr><th title='{desc}'>{esc(label)}</th><td>{len(entry['seeds'])}</td>{cells}</tr>")
    start = summary.get("start_model")
    if start:  # the shared warmed-up start model, evaluated like the final ones: the "before RL" reference
        curve = {int(key[5:]): v for key, v in start.items() if key.startswith("pass@") and key[5:].isdigit()}
        values = {"heldout_accuracy": start.get("greedy_accuracy"), "pass@1": curve.get(1),
                  "pass@k": curve[max(curve)] if curve else None}
        cells = "".join(_cell({"mean": values.get(key)} if values.get(key) is not None else None)
                        for key, _ in TABLE_METRICS)
        rows.append(f"<tr class='start'><th>start model</th><td>–</td>{cells}</tr>")
    diff_rows = []
    for label, entry in summary["differences"].items():
        cells = "".join(_cell(entry.get(key), signed=True) for key, _ in TABLE_METRICS)
        methods = {e["method"] for e in entry.values() if e}
        diff_rows.append(f"<tr><th>{esc(label)} − {esc(summary['baseline'] or '')}</th>"
                         f"<td>{esc('/'.join(sorted(methods)) or '–')}</td>{cells}</tr>")
    images = []
    for stem, png in plots.items():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        images.append(f"<figure><img id='plot-{esc(stem)}' alt='{esc(stem.replace('_', ' '))}' "
                      f"src='data:image/png;base64,{data}'></figure>")
    run_rows = []
    for run in summary["runs"]:
        error = f"<pre>{esc(run['error'][-600:])}</pre>" if run.get("error") else ""
        run_rows.append(f"<tr><td>{esc(run['label'])}</td><td>{run['seed']}</td><td class='{esc(run['status'])}'>"
                        f"{esc(run['status'])}</td><td>{run['steps']}</td><td>{esc(run['dir'])}{error}</td></tr>")
    settings = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in spec.items())
    headline_list = "".join(f"<li>{esc(line)}</li>" for line in summary.get("headlines", [])) or "<li>one recipe: nothing to compare</li>"
    recipe_list = "".join(f"<li><b>{esc(lab)}</b>: {esc(descriptions.get(lab, ''))}</li>" for lab in labels)
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>policylab arena: {esc(str(spec.get('name', '')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td.na {{ color: #999; text-align: center; }}
td.failed {{ color: #b00; }} td.missing {{ color: #a60; }} td.done {{ color: #070; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 640px; border: 1px solid #ddd; }}
.note {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>policylab arena: {esc(str(spec.get('name', '')))}</h1>
<ul>{recipe_list}</ul>
<h2>What won</h2>
<ul id="headlines">{headline_list}</ul>
<h2>Results</h2>
<table id="results"><thead><tr><th>recipe</th><th>seeds</th>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>
<p class="note">Mean ± half-width of the 95% Student-t interval over seeds (no interval with one seed).
Held-out numbers come from the final model; pass@k uses the unbiased estimator. "last 20%" = mean over the
last fifth of training steps; train reward is over the batch each update used (after any group filter:
DAPO's dynamic sampling keeps only groups with differing rewards, so its train reward reads higher);
s/step = median wall-clock seconds per step; CPU s/step = median CPU seconds of the training process per
step (all its threads), which other load on the machine changes far less than wall-clock time. The start
model row is the model every run starts from (the arena's warm-up, or the model itself), evaluated like the
final ones.</p>
<h2>Difference to {esc(summary['baseline'] or '')}</h2>
<table id="differences"><thead><tr><th>recipe</th><th>CI</th>{header}</tr></thead><tbody>{''.join(diff_rows)}</tbody></table>
<p class="note">Mean difference with its 95% t-interval: paired over seeds when both recipes ran the same seeds
(same seed = same data order), Welch otherwise. Bold: the interval excludes 0. A zero-width interval means every
seed gave the same difference; with fewer than 5 seeds that is inconclusive, not significant.</p>
<h2>Curves</h2>
<p class="note">Lines: mean over seeds (smoothed when the title says so; the faint line is unsmoothed);
bands: min–max across seeds.</p>
{''.join(images)}
<h2>Settings</h2><table id="settings">{settings}</table>
<h2>Runs</h2>
<table id="runs"><thead><tr><th>recipe</th><th>seed</th><th>status</th><th>steps</th><th>folder</th></tr></thead>
<tbody>{''.join(run_rows)}</tbody></table>
</body></html>
"""
    path.write_text(document, encoding="utf-8")
    return path
