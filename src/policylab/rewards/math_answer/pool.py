"""Time limits by process isolation (data_agents_eval.md §C1.3 Timeouts): no signals, safe from threads.

Each :class:`VerifierPool` owns a few long-lived worker processes (:mod:`.worker`).  A call checks one
worker out (threads queue for a free one), sends it the extracted candidates, and reads the worker's
stage reports with ``select`` deadlines:

* each parse must finish within ``parse_timeout_s`` of its ``parse`` report,
* the comparison within ``compare_timeout_s`` of its ``compare`` report,
* everything within ``call_timeout_s`` of sending the job.

On any overrun the worker is killed (SIGKILL to that one child — SymPy stuck in C code on
``10^{10^{10^{10}}}`` cannot be interrupted any other way) and the call returns ``reason="timeout"``
with ``timeout_score``; the slot restarts a fresh worker on its next use.  Worker start-up time is not
charged to a call.

Workers are started with ``python -c`` (not ``multiprocessing``), so the caller's ``__main__`` is never
re-imported and the pool works the same from scripts, notebooks, threads and Ray tasks.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from policylab.rewards.math_answer.core import (
    DEFAULT_OPTIONS,
    Extraction,
    VerifierOptions,
    VerifyResult,
    extract_pair,
    fast_result,
)

STARTUP_TIMEOUT_S = 120.0
MAX_PROBLEM_CHARS = 50_000


class VerifierUnavailable(RuntimeError):
    """A worker process could not be started."""


class _WorkerDied(RuntimeError):
    pass


def _package_dir() -> str:
    # .../src/policylab/rewards/math_answer/pool.py -> .../src/policylab
    return str(Path(__file__).resolve().parents[2])


# The worker needs only this subpackage. ``policylab/__init__.py`` imports torch (seconds of start-up per
# worker), so the bootstrap registers a bare ``policylab`` package object pointing at the same folder and
# imports the worker module through it.
_BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('policylab')\n"
    "package.__path__ = [sys.argv[1]]\n"
    "sys.modules['policylab'] = package\n"
    "from policylab.rewards.math_answer.worker import main\n"
    "sys.exit(main())\n"
)


class _Worker:
    """One worker process and the line-buffered reader of its stdout."""

    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.process: subprocess.Popen | None = None
        self._buffer = b""
        self._stderr = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        env = dict(os.environ)
        env["POLICYLAB_VERIFIER_MEMORY_MB"] = str(self.memory_mb)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._stderr = tempfile.TemporaryFile()
        self._buffer = b""
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, _package_dir()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            close_fds=True,
        )
        message = self.read(time.monotonic() + STARTUP_TIMEOUT_S)
        if not message or not message.get("ready"):
            detail = self._stderr_tail()
            self.kill()
            raise VerifierUnavailable(f"math verifier worker process did not start: {detail}")

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")[-2000:] or "no output"
        except (OSError, ValueError, AttributeError):
            return "no output"

    def send(self, message: dict) -> None:
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise _WorkerDied(str(err)) from err

    def read(self, deadline: float) -> dict | None:
        """The next message, or None if ``deadline`` (monotonic) passes first."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerDied("worker closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            try:
                process.kill()
                process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except (OSError, AttributeError):
                    pass
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def request_exit(self) -> None:
        """Close the worker's stdin: it exits at end of input."""
        if self.process is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """Wait briefly for a requested exit, then make sure the process is gone."""
        process = self.process
        if process is None:
            return
        self.request_exit()
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class VerifierPool:
    """A fixed number of verifier worker processes shared by all threads of this process.

    ``workers``: number of processes (default: ``POLICYLAB_VERIFIER_WORKERS`` or min(4, CPU count)).
    ``memory_mb``: address-space cap of each worker (0 = none).
    """

    def __init__(self, workers: int | None = None, *, memory_mb: int = 3072):
        if workers is None:
            workers = int(os.environ.get("POLICYLAB_VERIFIER_WORKERS", "0") or 0) or min(4, os.cpu_count() or 1)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"VerifierPool: workers must be a positive int, got {workers!r}")
        self.size = workers
        self.pid = os.getpid()
        self._all = [_Worker(memory_mb) for _ in range(workers)]
        # last in, first out: a warm worker is reused before a cold one is started
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        for worker in self._all:
            self._idle.put(worker)
        self._job_ids = iter(range(1, 1 << 62))
        self._id_lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start every worker now (otherwise each starts on first use)."""
        taken = [self._idle.get() for _ in range(self.size)]
        try:
            for worker in taken:
                if not worker.alive:
                    worker.start()
        finally:
            for worker in taken:
                self._idle.put(worker)

    def close(self) -> None:
        self._closed = True
        if os.getpid() != self.pid:  # a forked child must not touch its parent's workers
            return
        for worker in self._all:  # all at once: each interpreter takes a moment to exit
            worker.request_exit()
        for worker in self._all:
            worker.close()

    def judge(
        self,
        gold_ex: Extraction,
        pred_ex: Extraction,
        problem: str | None = None,
        options: VerifierOptions = DEFAULT_OPTIONS,
    ) -> VerifyResult:
        """Parse and compare the extracted candidates in a worker, under the three time limits."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if os.getpid() != self.pid:
            raise RuntimeError("VerifierPool was created in another process (fork); create a new pool here")
        gold_str, pred_str = gold_ex.candidates[0], pred_ex.candidates[0]
        with self._id_lock:
            job_id = next(self._job_ids)
        job = {
            "id": job_id,
            "gold": list(gold_ex.candidates),
            "pred": list(pred_ex.candidates),
            "problem": problem[:MAX_PROBLEM_CHARS] if problem else None,
        }
        worker = self._idle.get()
        try:
            if not worker.alive:
                worker.start()
            return self._run(worker, job, options, gold_str, pred_str)
        finally:
            self._idle.put(worker)

    @staticmethod
    def _run(worker: _Worker, job: dict, options: VerifierOptions, gold_str: str, pred_str: str) -> VerifyResult:
        try:
            worker.send(job)
            started = time.monotonic()
            call_deadline = started + options.call_timeout_s
            stage_deadline = call_deadline
            while True:
                message = worker.read(min(call_deadline, stage_deadline))
                if message is None:
                    worker.kill()
                    return options.timeout(gold_str, pred_str)
                if message.get("id") != job["id"]:
                    continue
                if "stage" in message:
                    limit = options.parse_timeout_s if message["stage"] == "parse" else options.compare_timeout_s
                    stage_deadline = time.monotonic() + limit
                elif "result" in message:
                    equal, reason, gold_used, pred_used = message["result"]
                    return options.result(equal, gold_used, pred_used, reason)
                else:
                    error = message.get("error", "unknown error")
                    if error == "memory_limit":  # scored like a timeout: a resource limit, not a verdict
                        worker.kill()
                        return VerifyResult(float(options.timeout_score), False, gold_str, pred_str, "memory_limit")
                    return options.result(False, gold_str, pred_str, f"error: {error}")
        except _WorkerDied:
            worker.kill()
            return options.result(False, gold_str, pred_str, "error: worker died")


_DEFAULT_POOL: VerifierPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool (created on first use, recreated after a fork, closed at exit)."""
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        if _DEFAULT_POOL is None or _DEFAULT_POOL.pid != os.getpid() or _DEFAULT_POOL._closed:
            _DEFAULT_POOL = VerifierPool()
            atexit.register(_DEFAULT_POOL.close)
        return _DEFAULT_POOL


def verify(
    gold: str,
    pred: str,
    *,
    problem: str | None = None,
    options: VerifierOptions | None = None,
    pool: VerifierPool | None = None,
) -> VerifyResult:
    """Verify a model response ``pred`` against the ``gold`` answer (data_agents_eval.md §C1).

    Plain-number pairs are settled in this process; everything else runs in a pool worker under the
    parse/compare/call time limits of ``options``.  ``problem`` (the question text) enables C1.3's
    rejection of an inequality copied from the problem.  Safe to call from any thread.
    """
    options = options or DEFAULT_OPTIONS
    gold_ex, pred_ex = extract_pair(gold, pred, options)
    quick = fast_result(gold_ex, pred_ex, options)
    if quick is not None:
        return quick
    return (pool or default_pool()).judge(gold_ex, pred_ex, problem, options)


def verify_batch(
    golds: list[str],
    preds: list[str],
    *,
    problems: list[str | None] | None = None,
    options: VerifierOptions | None = None,
    pool: VerifierPool | None = None,
) -> list[VerifyResult]:
    """:func:`verify` over pairs, results in input order; non-trivial pairs run in parallel workers."""
    if len(golds) != len(preds):
        raise ValueError(f"verify_batch: {len(golds)} golds but {len(preds)} preds")
    if problems is not None and len(problems) != len(golds):
        raise ValueError(f"verify_batch: {len(problems)} problems for {len(golds)} golds")
    options = options or DEFAULT_OPTIONS
    results: list[VerifyResult | None] = [None] * len(golds)
    pending: list[tuple[int, Extraction, Extraction]] = []
    for index, (gold, pred) in enumerate(zip(golds, preds)):
        gold_ex, pred_ex = extract_pair(gold, pred, options)
        quick = fast_result(gold_ex, pred_ex, options)
        if quick is not None:
            results[index] = quick
        else:
            pending.append((index, gold_ex, pred_ex))
    if pending:
        pool = pool or default_pool()
        if len(pending) == 1 or pool.size == 1:
            for index, gold_ex, pred_ex in pending:
                results[index] = pool.judge(gold_ex, pred_ex, problems[index] if problems else None, options)
        else:
            with ThreadPoolExecutor(max_workers=pool.size, thread_name_prefix="math-verify") as executor:
                futures = {
                    index: executor.submit(pool.judge, gold_ex, pred_ex, problems[index] if problems else None, options)
                    for index, gold_ex, pred_ex in pending
                }
                for index, future in futures.items():
                    results[index] = future.result()
    return results  # type: ignore[return-value]
