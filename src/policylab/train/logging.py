"""Run outputs: metrics.jsonl (one line per step), samples.jsonl, a rich progress bar (or one line per step
when stderr is not a terminal), and at the end the run's summary and curves PNG (train/run_report.py).

Lines are strict JSON: a non-finite number (NaN, ±inf) is written as null, never as ``NaN``/``Infinity``, which
other JSON readers reject. A line torn by a kill or a full disk can only be the last one; a resume reports it and
drops it, and rewrites the file by write-to-temporary-and-rename (train/run_dir.py), so a kill during the resume
loses nothing."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from policylab.rollouts import Rollouts
from policylab.train import run_report
from policylab.train.errors import TrainingError
from policylab.train.run_dir import os_reason, write_atomic


CONVERSATION_FIELDS = ("conversation", "termination")  # written by the agent engine (rollout/agent.py)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 1024


def _stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return {}
    return {f"{prefix}/mean": float(x.mean()), f"{prefix}/std": float(x.std()) if x.numel() > 1 else 0.0,
            f"{prefix}/max": float(x.max()), f"{prefix}/min": float(x.min())}


def batch_metrics(batch: Rollouts) -> dict[str, float]:
    out: dict[str, float] = {}
    rewards = batch.rewards
    out.update(_stats("reward", rewards))
    out["reward/failed"] = float(torch.isnan(rewards).sum())
    for name, values in batch.reward_components.items():
        valid = values[~torch.isnan(values)]
        if valid.numel():
            out[f"reward/{name}" if name != "accuracy" else "accuracy"] = float(valid.mean())
    if batch.advantages is not None:
        adv = batch.advantages
        adv = adv[batch.completion_mask > 0] if adv.dim() == 2 else adv
        out.update(_stats("advantage", adv.float()))
    filled = torch.nan_to_num(rewards, nan=0.0)
    groups = torch.unique(batch.group)
    zero_std = [bool((filled[batch.group == g].max() == filled[batch.group == g].min())) for g in groups]
    out["groups/zero_std_frac"] = sum(zero_std) / len(zero_std)
    lengths = batch.completion_mask.sum(-1)
    out["completion_length/mean"] = float(lengths.mean())
    out["completion_length/max"] = float(lengths.max())
    out["truncated_frac"] = float(batch.truncated.float().mean())
    out["batch/completions"] = float(batch.batch_size)
    out["batch/tokens"] = float(lengths.sum())
    return out


class RunLogger:
    def __init__(self, run_dir: Path, progress: bool = True, total_steps: int = 0):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.total = total_steps
        self.progress_enabled = progress and sys.stderr.isatty()
        self._progress = None
        self._task = None
        self.last: dict[str, Any] = {}
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self._step_times: list[float] = []  # this session's step times, for the ETA

    def start(self, step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # printed first, before any step, so the folder can be watched (`policylab show`) while the run goes
        print(f"policylab: run folder {self.run_dir} (step {step} of {self.total}); "
              f"watch it with: policylab show {self.run_dir}", file=sys.stderr, flush=True)
        if self.progress_enabled:
            from rich.progress import BarColumn, Progress, TextColumn

            # a short bar, so an 80-column terminal still shows the step count and every field in full
            self._progress = Progress(TextColumn("[bold]step {task.completed:.0f}/{task.total:.0f}"),
                                      BarColumn(bar_width=16), TextColumn("{task.fields[info]}"), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=step, info="")

    def _append(self, path: Path, record: dict) -> None:
        line = json.dumps(finite_json(record), default=_jsonable, allow_nan=False) + "\n"
        try:
            with path.open("a") as f:
                f.write(line)
        except OSError as err:
            raise TrainingError(f"could not append to {path}: {os_reason(err)}") from err

    def log_step(self, step: int, metrics: dict[str, Any], batch: Rollouts, n_samples: int) -> None:
        record = {"step": step, **{k: v for k, v in sorted(metrics.items()) if k != "step"}}
        self._append(self.metrics_path, record)
        for i in range(min(n_samples, batch.batch_size)):
            reward = float(batch.rewards[i]) if batch.rewards is not None else None
            record = {"step": step, "prompt": batch.prompts[i], "completion": batch.completions[i],
                      "answer": batch.rows[i].get("answer"), "reward": reward}
            for name in CONVERSATION_FIELDS:  # a multi-turn episode: its messages and how it ended, readable
                if name in batch.extras:
                    record[name] = batch.extras[name][i]
            self._append(self.samples_path, record)
        self.last = record
        self._step_times.append(float(metrics.get("time/step_s", float("nan"))))
        info = self.progress_info(step, metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def progress_info(self, step: int, metrics: dict[str, Any]) -> str:
        """The progress fields after ``step``: reward, accuracy, s/step, ETA and the last evaluation."""
        step_s = metrics.get("time/step_s", float("nan"))
        eta = run_report.eta_seconds(self.total - step, self._step_times)
        info = (f"reward {metrics.get('reward/mean', float('nan')):.3f}  acc {metrics.get('accuracy', float('nan')):.3f}  "
                f"{step_s:.2f} s/step  ETA {run_report.format_duration(eta)}")
        if self.last_eval is not None:
            eval_step, ev = self.last_eval
            info += f"  eval {ev.get('eval/accuracy', float('nan')):.3f} @ step {eval_step}"
        return info

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self._append(self.metrics_path, {"step": step, **metrics})
            self.last_eval = (step, metrics)
            if self._progress is None:
                sampled = metrics.get("eval/accuracy_sampled")
                print(f"eval @ step {step}: accuracy {metrics.get('eval/accuracy', float('nan')):.3f} greedy"
                      + (f", {sampled:.3f} sampled" if sampled is not None else ""), file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"policylab: {message}", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On resume: lines after the checkpoint's step move to metrics.discarded.jsonl (they will be redone).
        A torn last line is reported and dropped; a bad line elsewhere is an error naming the file and line."""
        for path in (self.metrics_path, self.samples_path):
            if not path.exists():
                continue
            keep, drop = [], []
            lines = path.read_text().splitlines()
            while lines and not lines[-1].strip():
                lines.pop()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    after = json.loads(line).get("step", 0) > step
                except (json.JSONDecodeError, AttributeError):
                    if number < len(lines):
                        raise TrainingError(f"{path}:{number} is not valid JSON; the file is damaged before its last "
                                            "line, which a kill cannot do: repair or remove that line") from None
                    self.warn(f"{path}:{number}: the last line is torn (the run was killed or the disk filled while "
                              f"writing it); dropped, its step is redone ({len(line)} characters kept in "
                              f"{path.with_suffix('.discarded.jsonl').name})")
                    after = True
                (drop if after else keep).append(line)
            if drop:
                with path.with_suffix(".discarded.jsonl").open("a") as f:
                    f.write("\n".join(drop) + "\n")
            write_atomic(path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        """Stop the bar, then write the curves PNG and print the summary (also after a crash or Ctrl-C:
        it says what was done and how to resume). It never raises, so it cannot hide the run's own error."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.metrics_path.exists():
            return  # nothing was logged (the run failed before its first step or evaluation)
        try:
            run = run_report.read_run(self.run_dir)
            run_report.plot_curves(run)
            text = run_report.format_summary(run_report.summarize(run, total_steps=self.total))
        except Exception as err:  # noqa: BLE001 - a summary problem must not replace the run's outcome
            self.warn(f"could not write the run summary or curves: {type(err).__name__}: {err}")
            return
        print(text, file=sys.stderr, flush=True)


def finite_json(x):
    """``x`` with every non-finite float replaced by None (JSON null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return finite_json(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
