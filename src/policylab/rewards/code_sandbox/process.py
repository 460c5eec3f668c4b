"""Launching one sandboxed Python process and reading what it says (issue 4 part 2).

The child (``_child.py``) confines itself; this side gives it a scrubbed environment, a fresh
temporary directory, a private result pipe and a per-run uid, reads its stdout, stderr and result
pipe up to fixed byte caps, enforces the wall clock, and afterwards kills everything the run left
behind: its process group, and, when running as root, every process owned by the run's uid (which
also catches grandchildren that started their own session).

A machine-wide pool (one slot per CPU this process may use) bounds how many sandboxes run at once,
however many threads call in.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CHILD_SCRIPT = str(Path(__file__).with_name("_child.py"))
ISOLATION_LEVELS = ("auto", "strict", "no_namespaces")
_SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_CTYPE": "C.UTF-8",
                 # native thread pools count against RLIMIT_NPROC and reserve address space per thread
                 "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_UID_RANGE = (1 << 24, 1 << 30)  # far above any account a host creates


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``wall_s`` counts from the moment the child reports it is confined (interpreter
    start-up is excluded, so a loaded machine does not fail correct programs); ``startup_s`` bounds
    that start-up itself. CPU time is capped at ``cpu_s`` (default: ``wall_s`` rounded up, plus 1)."""

    wall_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    tmpfs_mb: int = 64
    max_procs: int = 16
    open_files: int = 256
    max_output_bytes: int = 1 << 20
    max_channel_bytes: int = 8 << 20
    startup_s: float = 30.0

    def __post_init__(self):
        for name in ("wall_s", "memory_mb", "file_size_mb", "tmpfs_mb", "max_procs", "open_files",
                     "max_output_bytes", "max_channel_bytes", "startup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")

    def for_child(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.wall_s + 0.999) + 1
        return {
            "cpu_s": max(1, int(cpu + 0.999)),
            "memory_bytes": self.memory_mb << 20,
            "file_size_bytes": self.file_size_mb << 20,
            "tmpfs_bytes": self.tmpfs_mb << 20,
            "max_procs": self.max_procs,
            "open_files": self.open_files,
        }


@dataclass
class SandboxResult:
    """What one run produced. ``returncode`` is negative for death by signal (e.g. -9, -11)."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    records: list[dict] = field(default_factory=list)  # result-pipe records after the isolation header
    isolation: str | None = None  # "namespaces", "uid" or "basic"; None if the child never got that far
    uid: int | None = None  # uid the program ran as
    setup_error: str | None = None
    timed_out: bool = False
    output_overflow: bool = False
    wall_s: float = 0.0

    @property
    def failure(self) -> str | None:
        """Why the run as a whole failed, or None."""
        if self.setup_error:
            return f"sandbox setup failed: {self.setup_error}"
        if self.isolation is None:
            return "sandbox did not start" + (" (timed out)" if self.timed_out else "")
        if self.timed_out:
            return "timeout"
        if self.output_overflow:
            return "output limit exceeded"
        return None


# --------------------------------------------------------------------------------------------------
# The machine-wide pool
# --------------------------------------------------------------------------------------------------
def machine_slots() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_slots = threading.BoundedSemaphore(machine_slots())
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def sandbox_pool() -> ThreadPoolExecutor:
    """Threads that wait on sandboxes; the number of live sandboxes is bounded separately by slots."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=machine_slots(), thread_name_prefix="policylab-sandbox")
        return _pool


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------
def run_python(job: dict, *, stdin: bytes | None = None, limits: SandboxLimits = SandboxLimits(),
               isolation: str = "auto", python: str | None = None) -> SandboxResult:
    """Run ``job`` (see ``_child.py``: mode "tests" or "io", solution, tests, step_timeout_s) in a
    fresh sandboxed interpreter. ``isolation``: "auto" (namespaces where possible, else the best
    fallback), "strict" (fail the run rather than fall back), "no_namespaces" (skip them; as root the
    uid drop still happens). The level reached is in ``SandboxResult.isolation``."""
    if isolation not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, got {isolation!r}")
    with _slots:
        return _run(job, stdin, limits, isolation, python or sys.executable)


def _run(job, stdin, limits, isolation, python) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="policylab-sandbox-")
    uid = random.SystemRandom().randrange(*_UID_RANGE)
    is_root = os.geteuid() == 0
    channel_r, channel_w = os.pipe()
    proc = None
    try:
        job = dict(job, isolation=isolation, uid=uid, channel_fd=channel_w, limits=limits.for_child())
        job_path = os.path.join(workdir, "job.json")
        with open(os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            json.dump(job, handle)
        stdin_path = os.path.join(workdir, "stdin")
        with open(os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(stdin or b"")
        env = dict(_SCRUBBED_ENV, HOME=workdir, TMPDIR=workdir)
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen(
                [python, "-I", "-B", CHILD_SCRIPT, job_path], stdin=stdin_file, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(channel_w,), cwd=workdir, env=env, start_new_session=True,
            )
        os.close(channel_w)
        channel_w = -1
        result = _collect(proc, channel_r, limits)
    finally:
        if proc is not None:
            _kill_everything(proc, uid if is_root else None)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        for fd in (channel_r, channel_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    result.returncode = proc.returncode
    return result


def _collect(proc: subprocess.Popen, channel_r: int, limits: SandboxLimits) -> SandboxResult:
    """Read the three pipes until they close, the deadline passes or a byte cap is hit."""
    streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), channel_r: bytearray()}
    caps = {proc.stdout.fileno(): limits.max_output_bytes, proc.stderr.fileno(): limits.max_output_bytes,
            channel_r: limits.max_channel_bytes}
    result = SandboxResult(returncode=None, stdout=b"", stderr=b"")
    selector = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    start = time.monotonic()
    deadline = start + limits.startup_s
    exited_at = None
    try:
        while selector.get_map():
            now = time.monotonic()
            if result.isolation is None and result.setup_error is None:
                header = _header(streams[channel_r])
                if header is not None:
                    _apply_header(result, header)
                    deadline = now + limits.wall_s
            if exited_at is None and _has_exited(proc):
                exited_at = now  # orphans may hold the pipes open: give them a moment, not the full clock
                deadline = min(deadline, now + 0.5)
            if now >= deadline:
                result.timed_out = exited_at is None
                break
            for key, _ in selector.select(timeout=min(deadline - now, 0.05)):
                fd = key.fd
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    selector.unregister(fd)
                    continue
                streams[fd] += data
                if len(streams[fd]) > caps[fd]:
                    del streams[fd][caps[fd]:]
                    result.output_overflow = True
            if result.output_overflow:
                break
    finally:
        selector.close()
    if result.isolation is None and result.setup_error is None:
        header = _header(streams[channel_r])
        if header is not None:
            _apply_header(result, header)
    result.stdout = bytes(streams[proc.stdout.fileno()])
    result.stderr = bytes(streams[proc.stderr.fileno()])
    result.records = _records(streams[channel_r])[1:]
    result.wall_s = time.monotonic() - start
    return result


def _apply_header(result: SandboxResult, header: dict) -> None:
    result.isolation, result.setup_error = header.get("isolation"), header.get("setup_error")
    result.uid = header.get("uid") if isinstance(header.get("uid"), int) else None


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it: its pid (and so its process-group id) must
    stay reserved until the group has been killed."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _header(buffer: bytearray) -> dict | None:
    end = buffer.find(b"\n")
    if end < 0:
        return None
    try:
        record = json.loads(buffer[:end])
    except ValueError:
        return {"setup_error": "unreadable first record"}
    return record if isinstance(record, dict) else {"setup_error": "unreadable first record"}


def _records(buffer: bytearray) -> list[dict]:
    """Complete JSON-object lines; anything else (a torn last line, garbage written by the program
    into the pipe) is skipped: the parent only trusts records it can check against expectations."""
    out = []
    for line in bytes(buffer).split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the run's process group, then (as root) every process of the run's private uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)
    proc.wait()


def _kill_uid(uid: int, max_passes: int = 200) -> None:
    """Kill every process whose real uid is ``uid`` until a pass finds none. RLIMIT_NPROC bounds how
    many there can be, and a killed process forks no more, so this ends after a few passes."""
    for _ in range(max_passes):
        found = False
        for pid in _pids_of_uid(uid):
            found = True
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not found:
            return


def _pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as handle:
                status = dict(line.split(b":", 1) for line in handle if b":" in line)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        state = status.get(b"State", b"").split()
        if int(status.get(b"Uid", b"-1 -1").split()[0]) == uid and state and state[0] not in (b"Z", b"X"):
            pids.append(int(name))
    return pids


def isolation_report(python: str | None = None) -> dict:
    """What this machine gives a sandbox: the level reached under "auto", uid inside, and whether the
    network and the host file system were reachable from inside."""
    probe = (
        "import os, socket\n"
        "net = 'open'\n"
        "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=0.5).close()\n"
        "except OSError as err:\n    net = type(err).__name__\n"
        "except BaseException as err:\n    net = type(err).__name__\n"
        "print(os.getuid(), net, os.access('/', os.W_OK))\n"
    )
    result = run_python({"mode": "io", "solution": probe, "tests": [], "step_timeout_s": 5.0},
                        limits=SandboxLimits(wall_s=5.0), python=python)
    uid, net, root_writable = (result.stdout.decode().split() + ["?", "?", "?"])[:3]
    return {"isolation": result.isolation, "setup_error": result.setup_error, "uid": uid,
            "network": net, "root_writable": root_writable, "running_as_root": os.geteuid() == 0}
