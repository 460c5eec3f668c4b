"""Worker process of the verifier pool: ``python -m policylab.rewards.math_answer.worker``.

Protocol (one JSON object per line; the parent is :mod:`.pool`):

* worker -> parent, once after start-up: ``{"ready": true}``;
* parent -> worker: ``{"id": n, "gold": [...], "pred": [...], "problem": str | null}``;
* worker -> parent, while working: ``{"id": n, "stage": "parse" | "compare"}`` before each parse and the
  comparison (the parent times each stage and kills this process when one overruns), then
  ``{"id": n, "result": [equal, reason, gold_used, pred_used]}`` or ``{"id": n, "error": "..."}``.

The worker exits when its stdin closes (the parent went away or closed the pool).  It caps its own
address space (``POLICYLAB_VERIFIER_MEMORY_MB``) so a runaway big-integer computation fails with
MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import sys


def _limit_memory() -> None:
    megabytes = int(os.environ.get("POLICYLAB_VERIFIER_MEMORY_MB", "0") or 0)
    if megabytes <= 0:
        return
    try:
        import resource

        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not POSIX, or the hard limit is lower already
        pass


def main() -> int:
    # Our protocol owns file descriptor 1; anything the libraries print goes to stderr instead.
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout = sys.stderr
    _limit_memory()

    from policylab.rewards.math_answer.core import judge
    from policylab.rewards.math_answer.parse import parse_answer

    parse_answer(r"\frac{1}{2}+x")  # load the LaTeX grammar before saying ready

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        job_id = job["id"]
        try:
            equal, reason, gold_used, pred_used = judge(
                job["gold"], job["pred"], job.get("problem"), on_stage=lambda stage: send({"id": job_id, "stage": stage})
            )
            send({"id": job_id, "result": [bool(equal), reason, gold_used, pred_used]})
        except MemoryError:
            send({"id": job_id, "error": "memory_limit"})
        except RecursionError:
            send({"id": job_id, "error": "recursion_limit"})
        except Exception as err:  # a bug or an input SymPy cannot handle: report, keep serving
            send({"id": job_id, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
