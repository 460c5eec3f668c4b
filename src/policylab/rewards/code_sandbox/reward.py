"""Running a solution against its tests, and the ``code_tests`` reward (issue 4 part 2)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from policylab.registry import register
from policylab.rewards.code_sandbox.harness import (
    COMPARE_MODES,
    PROBE_PREFIX,
    CompiledTest,
    compile_test,
    decode_value,
    evaluate_check,
    outputs_match,
)
from policylab.rewards.code_sandbox.process import SandboxLimits, SandboxResult, run_python, sandbox_pool

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
EXTRACT_MODES = ("auto", "last_block", "raw")


@dataclass(frozen=True)
class CaseOutcome:
    passed: bool
    detail: str  # "passed", "wrong answer", "timeout", "error: ...", "not run: ..."


@dataclass
class CodeRunResult:
    outcomes: list[CaseOutcome]
    isolation: str | None  # level the sandbox reported ("namespaces", "uid" or "basic")
    sandbox_failed: bool = False  # the sandbox itself did not start: no verdict on the code
    runs: list[SandboxResult] = field(default_factory=list)

    @property
    def pass_fraction(self) -> float:
        return sum(o.passed for o in self.outcomes) / len(self.outcomes) if self.outcomes else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)


def extract_code(completion: str, mode: str = "auto") -> str:
    """The program in a completion: the last fenced python block (``last_block``), the whole text
    (``raw``), or the last block if there is one and else the whole text (``auto``)."""
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {mode!r}")
    if mode == "raw":
        return completion
    blocks = _FENCE.findall(completion)
    if blocks:
        return blocks[-1]
    return completion if mode == "auto" else ""


def run_code_tests(code: str, *, tests: list[str] | None = None, io: list[dict] | None = None,
                   timeout_s: float = 5.0, limits: SandboxLimits | None = None, compare: str = "lines",
                   isolation: str = "auto", max_wall_s: float = 120.0) -> CodeRunResult:
    """Run ``code`` against assert strings (one sandboxed process for all of them, each step under
    its own ``timeout_s``) or stdin/stdout cases (one process per case, ``timeout_s`` each, run
    concurrently on the machine's pool). Exactly one of ``tests`` and ``io`` must be given."""
    if (tests is None) == (io is None):
        raise ValueError("run_code_tests needs exactly one of tests= (assert strings) or io= (stdin/stdout cases)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if compare not in COMPARE_MODES:
        raise ValueError(f"compare must be one of {COMPARE_MODES}, got {compare!r}")
    limits = limits or SandboxLimits()
    if tests is not None:
        return _run_asserts(code, _as_list(tests, "tests"), timeout_s, limits, isolation, max_wall_s)
    return _run_io(code, _as_list(io, "io"), timeout_s, limits, compare, isolation)


def _as_list(value, name: str) -> list:
    if isinstance(value, str):  # datasets often store lists as JSON text
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{name} is a string that is not a JSON list: {value[:80]!r}") from err
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _run_asserts(code, tests, timeout_s, limits, isolation, max_wall_s) -> CodeRunResult:
    compiled = [compile_test(t, i) for i, t in enumerate(tests)]
    if not compiled:
        return CodeRunResult([], None)
    num_steps = 1 + sum(len(c.steps) for c in compiled)
    limits = replace(limits, wall_s=min(max_wall_s, timeout_s * num_steps + 1.0))
    job = {"mode": "tests", "solution": code, "step_timeout_s": timeout_s,
           "tests": [[list(step) for step in c.steps] for c in compiled]}
    run = run_python(job, limits=limits, isolation=isolation)
    return CodeRunResult(_assert_outcomes(compiled, run), run.isolation, _sandbox_failed(run), [run])


def _sandbox_failed(run: SandboxResult) -> bool:
    return run.setup_error is not None or run.isolation is None


def _assert_outcomes(compiled: list[CompiledTest], run: SandboxResult) -> list[CaseOutcome]:
    """Judge each test from the child's records: the child must have finished the test, every probe
    must have exactly one value, no step may have failed, and every check must hold here."""
    stopped = run.failure or (f"exit status {run.returncode}" if run.returncode else "no result")
    errors: dict[int, str] = {}
    values: dict[int, dict[int, object]] = {}
    duplicated: set[int] = set()
    finished: set[int] = set()
    for record in run.records:
        if "solution_error" in record:
            return [CaseOutcome(False, f"error: {record['solution_error']}"[:500]) for _ in compiled]
        test = record.get("test")
        if not isinstance(test, int) or not 0 <= test < len(compiled):
            continue
        if record.get("finished") is True:
            finished.add(test)
            continue
        if "error" in record:
            errors.setdefault(test, str(record["error"])[:500])
            continue
        probe = record.get("probe")
        if not isinstance(probe, int) or "value" not in record:
            continue
        if probe in values.setdefault(test, {}):
            duplicated.add(test)  # only a program writing into the result pipe produces this
        try:
            values[test][probe] = decode_value(record["value"])
        except (ValueError, TypeError, OverflowError) as err:
            errors.setdefault(test, f"unreadable value: {err}")
    outcomes = []
    for index, test in enumerate(compiled):
        if index in duplicated:
            outcomes.append(CaseOutcome(False, "conflicting results"))
        elif index in errors:
            detail = errors[index]
            outcomes.append(CaseOutcome(False, detail if detail == "timeout" else f"error: {detail}"))
        elif index not in finished or any(k not in values.get(index, {}) for k in range(test.num_probes)):
            outcomes.append(CaseOutcome(False, f"not run: {stopped}"))
        else:
            probes = {f"{PROBE_PREFIX}{k}": v for k, v in values.get(index, {}).items()}
            outcomes.append(_check_all(test, probes))
    return outcomes


def _check_all(test: CompiledTest, probes: dict) -> CaseOutcome:
    for check in test.checks:
        try:
            if not evaluate_check(check, probes):
                return CaseOutcome(False, "wrong answer")
        except Exception as err:  # noqa: BLE001 - a check that raises is a failed assert
            return CaseOutcome(False, f"error: {type(err).__name__}: {err}"[:500])
    return CaseOutcome(True, "passed")


def _run_io(code, cases, timeout_s, limits, compare, isolation) -> CodeRunResult:
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or "stdout" not in case:
            raise ValueError(f"io case #{i} must be a dict with 'stdin' and 'stdout', got {case!r:.80}")
    if not cases:
        return CodeRunResult([], None)
    limits = replace(limits, wall_s=timeout_s)
    job = {"mode": "io", "solution": code, "tests": [], "step_timeout_s": timeout_s}
    futures = [sandbox_pool().submit(run_python, job, stdin=str(c.get("stdin", "")).encode(), limits=limits,
                                     isolation=isolation) for c in cases]
    runs = [f.result() for f in futures]
    outcomes = []
    for case, run in zip(cases, runs):
        if run.failure:
            outcomes.append(CaseOutcome(False, run.failure))
        elif run.returncode != 0:
            tail = run.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            outcomes.append(CaseOutcome(False, f"error: exit status {run.returncode} {tail[0]}".strip()[:500]))
        elif outputs_match(run.stdout.decode("utf-8", "replace"), str(case["stdout"]), compare):
            outcomes.append(CaseOutcome(True, "passed"))
        else:
            outcomes.append(CaseOutcome(False, "wrong answer"))
    isolation_seen = next((r.isolation for r in runs if r.isolation), None)
    return CodeRunResult(outcomes, isolation_seen, any(_sandbox_failed(r) for r in runs), runs)


@register("reward", "code_tests", spec="issue 4 §2 (code execution reward)")
def code_tests(prompt: str, completion: str, row: dict, *, timeout_s: float = 5.0, memory_mb: int = 1024,
               all_or_nothing: bool = False, extract: str = "auto", compare: str = "lines",
               isolation: str = "auto") -> float | None:
    """Fraction of the row's tests the completion's program passes, run in a sandbox.

    ``row["tests"]``: assert strings (expected values are compared in the parent, never shown to the
    program); or ``row["io"]``: ``[{"stdin": ..., "stdout": ...}]`` cases. A completion without code
    scores 0; a sandbox that could not start returns None (failed reward, not a wrong answer).
    ``all_or_nothing`` gives 1 only when every test passes.
    """
    tests, io = row.get("tests"), row.get("io")
    if tests is None and io is None:
        raise KeyError("code_tests needs a 'tests' column (list of assert strings) or an 'io' column "
                       "(list of {stdin, stdout}) in the task row")
    code = extract_code(completion, extract)
    if not code.strip():
        return 0.0
    limits = SandboxLimits(memory_mb=memory_mb)
    result = run_code_tests(code, tests=tests, io=io if tests is None else None, timeout_s=timeout_s,
                            limits=limits, compare=compare, isolation=isolation)
    if result.sandbox_failed:
        return None
    return float(result.all_passed) if all_or_nothing else result.pass_fraction
