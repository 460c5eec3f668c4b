"""Step judges: ``(prompt, completion) -> per-step verdicts``, shared by FAPO (reward shaping, arXiv:2510.22543)
and CAPO credit (an advantage, arXiv:2508.02298).

A verdict list has one bool per step of ``completion.split(delimiter)`` — True = the step is judged
correct, False = flawed — or is None when the judge's output could not be parsed. Any callable with
that signature works; :func:`resolve_judge` also accepts a name ("arithmetic", "none"), "module:attr" or a
mapping of LLM-judge options. "policy" (the trained policy as its own critic) needs the model, so it is
built by the annotator that uses it (policylab/annotate/step_credit.py); here it resolves to None.
"""

from __future__ import annotations

import importlib
import re
from typing import Optional, Protocol, Sequence

from policylab.rewards.judges.rewards import cached_judge

Verdicts = Optional[Sequence[bool]]


class StepJudge(Protocol):
    def __call__(self, prompt: str, completion: str) -> Verdicts: ...


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    return text.split(delimiter)


_EQUATION = re.compile(r"(-?\d+(?:\s*[-+*]\s*-?\d+)+)\s*=\s*(-?\d+)")


def arithmetic_step_judge(prompt: str, completion: str, *, delimiter: str = "\n\n") -> list[bool]:
    """A rule judge for the arithmetic testbed: a step is flawed iff one of its "a op b ... = c" claims is false."""
    verdicts = []
    for step in split_steps(completion, delimiter):
        ok = True
        for lhs, rhs in _EQUATION.findall(step):
            if not re.fullmatch(r"[-+*\d\s]+", lhs):
                continue
            ok = ok and eval(lhs, {"__builtins__": {}}) == int(rhs)  # lhs is digits, spaces and + - * only
        verdicts.append(ok)
    return verdicts


def no_flaw_judge(prompt: str, completion: str, *, delimiter: str = "\n\n") -> list[bool]:
    return [True] * len(split_steps(completion, delimiter))


def resolve_judge(spec, *, delimiter: str = "\n\n") -> StepJudge | None:
    """A judge from a callable, a built-in name, "package.module:attribute", or a mapping of LLM-judge
    options (``{backend: hf|openai, model: ..., base_url: ..., k: ...}``, see :func:`llm_judge`);
    "policy" -> None (the annotator builds its policy critic from ``ctx``)."""
    if callable(spec):
        return spec
    if isinstance(spec, dict):
        return LLMStepJudge(llm_judge(spec), delimiter=delimiter)
    if spec == "arithmetic":
        return lambda p, c: arithmetic_step_judge(p, c, delimiter=delimiter)
    if spec == "none":
        return lambda p, c: no_flaw_judge(p, c, delimiter=delimiter)
    if spec == "policy":
        return None
    if isinstance(spec, str) and ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import judge {spec!r}: {err}") from None
        if not callable(target):
            raise ValueError(f"judge {spec!r} is not callable")
        return target
    raise ValueError(f"unknown judge {spec!r}: use 'arithmetic', 'none', 'policy', 'module:attr', "
                     "a mapping of LLM-judge options or a callable")


CRITIQUE_PROMPT = (
    "Check the solution below step by step. Steps are numbered from 1.\n\nProblem:\n{prompt}\n\nSolution:\n{steps}\n\n"
    "List the numbers of the wrong steps as 'Wrong steps: 2, 5', or write 'Wrong steps: none'.\n"
)
_WRONG = re.compile(r"wrong steps?\s*:\s*(none|[\d,\s]+)", re.IGNORECASE)


def parse_critique(text: str, num_steps: int) -> list[bool] | None:
    """'Wrong steps: 2, 5' -> verdicts with steps 2 and 5 (1-based) False; 'none' -> all True; else None."""
    found = _WRONG.search(text)
    if not found:
        return None
    verdicts = [True] * num_steps
    if found.group(1).strip().lower() == "none":
        return verdicts
    for number in re.findall(r"\d+", found.group(1)):
        k = int(number) - 1
        if 0 <= k < num_steps:
            verdicts[k] = False
    return verdicts


def critique_prompt(prompt: str, completion: str, delimiter: str = "\n\n") -> str:
    steps = split_steps(completion, delimiter)
    numbered = "\n".join(f"Step {k + 1}: {s.strip()}" for k, s in enumerate(steps))
    return CRITIQUE_PROMPT.format(prompt=prompt, steps=numbered)


LLM_JUDGE_DEFAULTS = {"backend": "openai", "model": "", "base_url": "http://127.0.0.1:8000",
                      "api_key_env": "OPENAI_API_KEY", "k": 1, "temperature": 0.0, "max_tokens": 256, "timeout_s": 60.0}


def llm_judge(options: dict):
    """A shared LLM judge (policylab.rewards.judges) from recipe options; unknown keys are an error."""
    unknown = sorted(set(options) - set(LLM_JUDGE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LLM judge option(s) {unknown}; valid: {sorted(LLM_JUDGE_DEFAULTS)}")

    return cached_judge(**{**LLM_JUDGE_DEFAULTS, **options})


class LLMStepJudge:
    """An external LLM (any ``policylab.rewards.judges`` Judge) as one-pass GenPRM: the k sampled critiques
    are merged per step by majority (a step is flawed if more than half of the parsed ones flag it)."""

    def __init__(self, judge, *, delimiter: str = "\n\n"):
        self.judge, self.delimiter = judge, delimiter

    def __call__(self, prompt: str, completion: str) -> Verdicts:
        n = len(split_steps(completion, self.delimiter))
        votes = self.judge.ask(critique_prompt(prompt, completion, self.delimiter), lambda text: parse_critique(text, n))
        parsed = [v for v in (votes or []) if v is not None]
        if not parsed:
            return None
        return [sum(not v[k] for v in parsed) * 2 <= len(parsed) for k in range(n)]


def first_flawed_step(verdicts: Verdicts) -> int:
    """Index of the earliest flawed step, −1 when none is flawed or the verdict is unparsable (FAPO)."""
    if verdicts is None:
        return -1
    for k, ok in enumerate(verdicts):
        if not ok:
            return k
    return -1

