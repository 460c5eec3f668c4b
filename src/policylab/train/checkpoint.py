"""Checkpoints: an HF-format model folder plus trainer state and a manifest, written under a temporary name and
renamed, so a crash or a full disk mid-write never leaves a half checkpoint where a complete one is expected.

``manifest.json`` (written last, inside the temporary folder) records every file's size and sha256; a resume
verifies them and falls back to the newest intact checkpoint with a warning. The trainer state is loaded with
``torch.load(weights_only=True)``: tensors and plain containers only, so a run directory from someone else
cannot execute code when it is resumed (the RNG states are stored as lists and tensors for that reason).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from policylab.train.errors import TrainingError
from policylab.train.run_dir import fsync_dir, os_reason

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"
_CHUNK = 1 << 20


def rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's state as plain values: an ndarray would need unpickling numpy globals on resume
             "numpy": {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # a checkpoint loaded by a caller that trusts it (weights_only=False), in the old tuple form
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_interval(save_every: int | str, steps: int) -> int:
    """Steps between periodic checkpoints (0 = none): ``auto`` is ten per run, at most 100 steps apart."""
    if save_every == "auto":
        return min(100, max(1, math.ceil(steps / 10)))
    return int(save_every)


class SaveSchedule:
    """When the loop writes a periodic checkpoint. A number N: every N steps. ``auto``: every tenth of the run
    (``save_interval``), except that a save is skipped while less than ``OVERHEAD`` times the last save's own
    duration has passed since it ended, so checkpoints cost at most about a tenth of the run's time (a
    SmolLM2-135M checkpoint with AdamW state is 1.5 GiB and took 11.7 s on a 2-core CPU, against 23 s/step)."""

    OVERHEAD = 10.0

    def __init__(self, save_every: int | str, steps: int, clock: Callable[[], float] = time.monotonic):
        self.auto, self.every, self.clock = save_every == "auto", save_interval(save_every, steps), clock
        self.last_end: float | None = None
        self.last_cost: float | None = None

    def due(self, step: int) -> bool:
        if not self.every or step % self.every:
            return False
        if not self.auto or self.last_cost is None:
            return True
        return self.clock() - self.last_end >= self.OVERHEAD * self.last_cost

    def run(self, save: Callable[[], Any]) -> Any:
        start = self.clock()
        out = save()
        self.last_end = self.clock()
        self.last_cost = self.last_end - start
        return out


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def save(run_dir: Path, step: int, model, tokenizer, trainer_state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write ``checkpoints/step-N``. Any failure (a full disk, a kill) removes the temporary folder; an OS error
    is a TrainingError naming the checkpoint and saying the previous one is intact."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(_plain(trainer_state), tmp / STATE_FILE)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp / STATE_FILE)
        if unsafe:  # caught at the first save, not at the resume that would need it
            raise TrainingError(f"the trainer state of step {step} holds objects a resume cannot load safely "
                                f"({', '.join(unsafe[:5])}); a component's state_dict must return tensors, numbers, "
                                "strings and lists/dicts of them")
        _write_manifest(tmp, step)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) or _disk_full(err):
            previous = latest(run_dir)
            raise TrainingError(
                f"could not write checkpoint {final}: {os_reason(err) if isinstance(err, OSError) else err}; "
                "the partial checkpoint was removed; "
                + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")) from err
        raise
    if final.exists():  # the same step saved again (a resumed run that redid it): the new one replaces it
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    for old in sorted(checkpoints(run_dir), key=step_of)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(err: BaseException) -> bool:
    # safetensors (Rust) reports ENOSPC as its own error type, not OSError
    text = str(err)
    return "No space left" in text or "StorageFull" in text or "os error 28" in text


def _plain(obj):
    """numpy values as tensors/Python numbers, so the state loads with weights_only=True."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if type(obj) in (list, tuple) else obj
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:  # durable before the rename publishes the checkpoint
                os.fsync(f.fileno())
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def verify(path: Path) -> str | None:
    """None when the checkpoint matches its manifest, else what is wrong (one phrase). A checkpoint written
    before manifests existed cannot be verified: None when its trainer state is there."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        return None if (path / STATE_FILE).exists() else f"{MANIFEST} and {STATE_FILE} are missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return [p for p in root.glob("step-*") if p.name.split("-")[1].isdigit()
            and ((p / MANIFEST).exists() or (p / STATE_FILE).exists())]


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint folder (not verified: cheap, for reports and eval)."""
    found = checkpoints(run_dir)
    return max(found, key=step_of) if found else None


def latest_intact(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint whose files match its manifest; each damaged newer one is named in a warning.
    None when there is no checkpoint; a TrainingError when every one is damaged."""
    found = sorted(checkpoints(run_dir), key=step_of, reverse=True)
    damaged = []
    for path in found:
        problem = verify(path)
        if problem is None:
            if damaged:
                warn(f"resuming from {path.name}, the newest intact checkpoint (steps after {step_of(path)} are redone)")
            return path
        damaged.append(f"{path.name}: {problem}")
        warn(f"checkpoint {path} is damaged ({problem}); trying the previous one")
    if damaged:
        raise TrainingError(f"no intact checkpoint under {Path(run_dir) / 'checkpoints'}: " + "; ".join(damaged))
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``, loaded without unpickling arbitrary objects."""
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise TrainingError(
            f"{file} holds objects other than tensors and plain containers ({first}); policylab does not unpickle "
            "them, since a run directory from elsewhere could run code that way. A checkpoint you wrote yourself "
            "with policylab before checkpoints were loaded safely can be converted once: "
            "python -m policylab.train.checkpoint --convert-trusted CHECKPOINT_DIR") from None


def convert_trusted(path: Path) -> None:
    """Rewrite an old checkpoint's trainer state (numpy RNG tuple) in the safe form. Only for your own files:
    it unpickles them."""
    file = Path(path) / STATE_FILE
    state = torch.load(file, weights_only=False)
    n = state["rng"]["numpy"]
    if not isinstance(n, dict):
        state["rng"]["numpy"] = {"name": n[0], "key": list(map(int, n[1])), "pos": int(n[2]),
                                 "has_gauss": int(n[3]), "gauss": float(n[4])}
    torch.save(_plain(state), file)
    manifest = Path(path) / MANIFEST
    if manifest.exists():
        manifest.unlink()
    _write_manifest(Path(path), int(state["step"]))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=convert_trusted.__doc__)
    parser.add_argument("--convert-trusted", metavar="CHECKPOINT_DIR", required=True)
    convert_trusted(Path(parser.parse_args().convert_trusted))
