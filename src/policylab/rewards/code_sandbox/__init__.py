"""Code execution reward: run model-written Python against tests in a sandbox (issue 4 part 2).

* :mod:`.process` launches one confined interpreter (``_child.py``) and reads it under byte caps and a
  wall clock; a machine-sized pool bounds concurrency.
* :mod:`.harness` splits assert strings so that expected values stay in the parent.
* :mod:`.reward` runs a solution against ``tests`` (asserts) or ``io`` (stdin/stdout) and registers
  the ``code_tests`` reward.

What the sandbox gives on a given machine: :func:`isolation_report`.
"""

from policylab.rewards.code_sandbox.process import SandboxLimits, SandboxResult, isolation_report, run_python
from policylab.rewards.code_sandbox.reward import (
    CaseOutcome,
    CodeRunResult,
    code_tests,
    extract_code,
    run_code_tests,
)

__all__ = [
    "CaseOutcome",
    "CodeRunResult",
    "SandboxLimits",
    "SandboxResult",
    "code_tests",
    "extract_code",
    "isolation_report",
    "run_code_tests",
    "run_python",
]
