"""The run directory's own safety: one process at a time (an advisory lock) and writes that a kill or a full
disk cannot tear (write to a temporary file, fsync, rename).

The lock is ``RUN_DIR/.lock``, held with ``fcntl.flock`` for the life of the run and holding the holder's PID.
The kernel drops a flock when its process dies, so a crashed run never blocks the next one; a lock file that
still names a PID but is not locked is a stale one (the holder died without releasing) and is taken over with a
warning. A cleanly released lock is emptied, so the next run starts silently. ``flock`` is not reliable on
some network file systems (old NFS); there the lock may not exclude a second machine.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Callable

from policylab.train.errors import TrainingError

LOCK_FILE = ".lock"


class RunDirLocked(TrainingError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory; ``release()`` (or closing the process) frees it."""

    def __init__(self, run_dir: Path, fd: int, created: bool = False):
        self.run_dir, self._fd = Path(run_dir), fd
        self.created = created  # acquire() made the directory (abandon() removes it again)

    @classmethod
    def acquire(cls, run_dir: str | Path, warn: Callable[[str], None] = print) -> "RunLock":
        run_dir = Path(run_dir)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = _read_pid(path)
            raise RunDirLocked(
                f"run directory {run_dir} is in use by another policylab process (PID {holder or 'unknown'}, "
                f"lock {path}); wait for it to finish, stop it, or choose another --run-dir") from None
        previous = _read_pid(path)
        if previous is not None and previous != os.getpid():
            warn(f"run directory {run_dir}: taking over the stale lock of PID {previous}, which is no longer "
                 "running (it ended without releasing the lock)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(run_dir, fd, created)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty = released cleanly; the file stays, so no one locks a deleted inode
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Release after a failed start: a directory this lock created and nothing else wrote is removed, so a
        recipe error leaves no empty run folder behind."""
        self.release()
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()
            except OSError:
                pass

    def __del__(self):  # a Trainer dropped without run() must not keep its directory locked
        try:
            self.release()
        except OSError:
            pass


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data``: a kill or a full disk leaves either the old file or the new one, never a
    truncated one. An OSError names the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a kill or a full disk: the old file stays, no temporary is left
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise TrainingError(f"could not write {path}: {os_reason(err)}") from err
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_reason(err: OSError) -> str:
    """An OSError in words, with the hint a full disk deserves."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (the disk or quota is full: free space, or move the run with --run-dir)"
    return reason
