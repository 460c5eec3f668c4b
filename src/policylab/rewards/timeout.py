"""A deadline for one reward call (``train.reward_timeout_s``), so a hanging reward costs one sample, not the run.

Python cannot kill a function running in a thread, so the deadline is enforced in two ways:

- in the main thread (where the training loop runs), with ``SIGALRM`` (``setitimer``): the handler raises
  inside the reward itself, which stops pure-Python loops, ``time.sleep`` and blocking socket/pipe reads at the
  deadline; the reward's ``finally`` blocks run, and a child process started with ``subprocess.run`` is killed by
  it. The exception is a BaseException, so a reward's ``except Exception`` cannot swallow it; a reward that still
  returns late (a bare ``except:``) is counted as timed out all the same.
- elsewhere (a reward called from a worker thread), or when an ``ITIMER_REAL`` is already armed by someone
  else, the call runs in a daemon thread that is abandoned at the deadline: the sample fails at once and training
  goes on, but the call keeps running in the background. At most ``MAX_ABANDONED`` such calls per reward are
  allowed to be alive; further calls of that reward fail immediately until they end.

Documented limitation: a single C call that holds the GIL (one huge regex backtrack, ``10**10**8``) is
interrupted only when it returns. Rewards that run untrusted code use the code sandbox (rewards/code_sandbox/),
whose child processes have their own CPU and wall-clock limits.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import defaultdict
from typing import Any, Callable

MAX_ABANDONED = 2
_abandoned: dict[str, list[threading.Thread]] = defaultdict(list)


class RewardTimedOut(Exception):
    """A reward call ran past its deadline (counted as a failed reward)."""


class _Deadline(BaseException):
    """Raised by the SIGALRM handler inside the reward; a BaseException, so ``except Exception`` lets it pass."""


def call_with_timeout(fn: Callable[..., Any], args: tuple, timeout_s: float, name: str = "reward") -> Any:
    """``fn(*args)``, or RewardTimedOut after ``timeout_s`` seconds (0 or less: no deadline)."""
    if not timeout_s or timeout_s <= 0:
        return fn(*args)
    if threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        return _with_alarm(fn, args, timeout_s, name)
    return _with_thread(fn, args, timeout_s, name)


def _with_alarm(fn, args, timeout_s: float, name: str):
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:  # a late signal after the call returned must not raise in the caller
            raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            result = fn(*args)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        raise RewardTimedOut(f"reward {name!r} did not return within {timeout_s:g} s (train.reward_timeout_s)") from None
    finally:
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
    if time.monotonic() - start > timeout_s:  # the reward caught the deadline itself and returned late
        raise RewardTimedOut(f"reward {name!r} returned after {time.monotonic() - start:.1f} s, past its "
                             f"{timeout_s:g} s deadline (train.reward_timeout_s)")
    return result


def _with_thread(fn, args, timeout_s: float, name: str):
    alive = [t for t in _abandoned[name] if t.is_alive()]
    _abandoned[name] = alive
    if len(alive) >= MAX_ABANDONED:
        raise RewardTimedOut(f"reward {name!r}: {len(alive)} earlier calls that timed out are still running; "
                             "failing this call without starting it")
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"policylab reward {name}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        alive.append(thread)
        raise RewardTimedOut(f"reward {name!r} did not return within {timeout_s:g} s (train.reward_timeout_s); "
                             "it was called outside the main thread, so it keeps running in the background")
    if "error" in box:
        raise box["error"]
    return box["value"]
