"""Run outputs: metrics.jsonl (one line per step), samples.jsonl, and a rich progress bar."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from policylab.rollouts import Rollouts


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

    def start(self, step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.progress_enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=step, info="")
        else:
            print(f"policylab: training in {self.run_dir} (step {step} of {self.total})", file=sys.stderr)

    def _append(self, path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def log_step(self, step: int, metrics: dict[str, Any], batch: Rollouts, n_samples: int) -> None:
        record = {"step": step, **{k: v for k, v in sorted(metrics.items()) if k != "step"}}
        self._append(self.metrics_path, record)
        for i in range(min(n_samples, batch.batch_size)):
            reward = float(batch.rewards[i]) if batch.rewards is not None else None
            self._append(self.samples_path, {"step": step, "prompt": batch.prompts[i], "completion": batch.completions[i],
                                             "answer": batch.rows[i].get("answer"), "reward": reward})
        self.last = record
        info = (f"reward {metrics.get('reward/mean', float('nan')):.3f}  acc {metrics.get('accuracy', float('nan')):.2f}  "
                f"{metrics.get('time/step_s', 0):.1f} s/step")
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self._append(self.metrics_path, {"step": step, **metrics})
            if self._progress is None:
                print(f"eval @ step {step}: accuracy {metrics.get('eval/accuracy', float('nan')):.3f}", file=sys.stderr)

    def warn(self, message: str) -> None:
        print(f"policylab: {message}", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On resume: lines after the checkpoint's step move to metrics.discarded.jsonl (they will be redone)."""
        for path in (self.metrics_path, self.samples_path):
            if not path.exists():
                continue
            keep, drop = [], []
            for line in path.read_text().splitlines():
                (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
            if drop:
                with path.with_suffix(".discarded.jsonl").open("a") as f:
                    f.write("\n".join(drop) + "\n")
            path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
