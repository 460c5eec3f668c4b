"""Ctrl-C and SIGTERM during training.

The first SIGINT/SIGTERM only asks the loop to stop: it finishes the step it is in, writes a checkpoint,
prints one line with the resume command and returns. A second one raises KeyboardInterrupt at once; the
checkpoints already written stay usable (train/checkpoint.py writes under a temporary name and renames).

A graceful stop leaves ``RUN_DIR/stopped.json`` (step, signal, resume command), so callers of
``policylab.train`` can tell a stopped run from a finished one; resuming the run removes it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

STOP_MARKER = "stopped.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Installs the two-stage handler for SIGINT and SIGTERM while in the ``with`` block and restores the
    previous handlers after. Outside the main thread Python cannot install handlers; then it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest we can restore
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler that prints while the main thread is inside a print to the same
        # stream gets "reentrant call" RuntimeError
        os.write(2, f"\npolicylab: {signal.Signals(signum).name} received; stopping after this step "
                    "(press Ctrl-C again to abort now)\n".encode())


def resume_command(run_dir: Path) -> str:
    return f"policylab train --resume {shlex.quote(str(run_dir))}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def write_marker(run_dir: Path, step: int, signum: int) -> None:
    record = {"step": step, "signal": signal.Signals(signum).name, "exit_code": exit_code(signum),
              "resume": resume_command(run_dir)}
    (Path(run_dir) / STOP_MARKER).write_text(json.dumps(record) + "\n")


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """What a graceful stop recorded in ``run_dir``, or None when the run was not stopped by a signal."""
    path = Path(run_dir) / STOP_MARKER
    return json.loads(path.read_text()) if path.exists() else None


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / STOP_MARKER).unlink(missing_ok=True)
