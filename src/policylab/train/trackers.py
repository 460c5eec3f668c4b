"""Experiment trackers named by ``train.report_to`` (TensorBoard, Weights & Biases, Trackio), each through
its own library. They mirror what metrics.jsonl records; metrics.jsonl stays the run's record.

Every adapter has ``log(step, metrics)`` and ``close()``. The libraries are the optional ``tracking`` extra:
a tracker whose package is missing stops the run before the model loads (:func:`check_installed`); a tracker
that fails later (full disk, lost network) is switched off with one warning and the run goes on.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from policylab.config import TRACKER_NAMES, RecipeError

EXTRA = "tracking"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker -> module it needs
PROJECT = "policylab"  # W&B / Trackio project; the run is named after its run directory


class TrackerUnavailable(RecipeError):
    """``train.report_to`` names a tracker whose library is not installed."""


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_installed(names: list[str]) -> None:
    """Fail fast, naming the extra, when a tracker's library is missing (find_spec imports nothing)."""
    for name in names:
        package = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise TrackerUnavailable(f"train.report_to: tracker {name!r} needs the {package!r} package, which is not "
                                     f"installed; install the extra: pip install 'policylab[{EXTRA}]' "
                                     f"(or drop {name!r} from train.report_to)")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record (what a tracker can plot); ``step`` is the x axis, not a metric."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    """Event files under ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``)."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # on resume, purge_step hides the events logged after the checkpoint, which the run redoes
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run under ``RUN_DIR/wandb``. Offline unless ``WANDB_MODE`` says otherwise or ``WANDB_API_KEY`` is
    set (then wandb decides, online by default); an offline run uploads later with ``wandb sync``."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        import wandb

        mode = os.environ.get("WANDB_MODE") or (None if os.environ.get("WANDB_API_KEY") else "offline")
        run_dir.mkdir(parents=True, exist_ok=True)
        # console="off": wandb's console capture wraps sys.stdout/stderr, which fights the progress line;
        # quiet: keep wandb's lines on where the run is saved and how to sync it, drop its end-of-run tables
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, dir=str(run_dir),
                              config=config, mode=mode, settings=wandb.Settings(console="off", quiet=True))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run in project ``policylab`` (local-first: a SQLite file under ``TRACKIO_DIR``, by default
    ``~/.cache/huggingface/trackio``; ``trackio show`` opens the dashboard). Trackio reads ``TRACKIO_DIR`` once,
    when it is imported, so the run directory cannot hold it per run."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        import trackio

        self.run = trackio.init(project=PROJECT, name=run_dir.name, config=config,
                                resume="allow" if resume_step else "never")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


ADAPTERS: dict[str, Callable[[Path, dict, int], Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}
assert set(ADAPTERS) == set(TRACKER_NAMES) == set(PACKAGES), "config.TRACKER_NAMES and the adapters must agree"


class Trackers:
    """The run's trackers behind one ``log``/``close``. A tracker that raises is switched off with one
    warning (through ``warn``); the others and the run go on."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, resume_step: int = 0,
                 warn: Callable[[str], None] = print):
        self.warn = warn
        self.active: dict[str, Tracker] = {}
        for name in names:
            try:
                self.active[name] = ADAPTERS[name](Path(run_dir), config, resume_step)
            except Exception as err:  # a tracker is a mirror of metrics.jsonl: never worth the run
                self._fail(name, "could not start", err)

    def _fail(self, name: str, what: str, err: Exception) -> None:
        self.active.pop(name, None)
        self.warn(f"tracker {name!r} {what} ({type(err).__name__}: {err}); it is off for the rest of the run "
                  "(metrics.jsonl has every step)")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = scalars(metrics)
        if not values:
            return
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(step, values)
            except Exception as err:
                self._fail(name, f"failed at step {step}", err)

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as err:
                self._fail(name, "failed while closing", err)
        self.active.clear()
