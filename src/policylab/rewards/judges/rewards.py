"""Registered judge rewards: ``judge_answer`` (C2), ``judge_rubric`` (C3), ``judge_pairwise`` (C4),
``judge_score``; one cached judge per backend configuration; :func:`judge_stats` for the metrics log."""

from __future__ import annotations

import threading
from collections import Counter

from policylab.registry import register
from policylab.rewards.judges.backends import HFJudge, Judge, OpenAIJudge
from policylab.rewards.judges.verdicts import AnswerJudge, PairwiseRubricJudge, RubricJudge, ScoreJudge

_JUDGES: dict[tuple, Judge] = {}
_JUDGES_LOCK = threading.Lock()


def cached_judge(backend: str, model: str, base_url: str, api_key_env: str | None, k: int, temperature: float,
                 max_tokens: int, timeout_s: float) -> Judge:
    """One judge per backend configuration, shared by every reward call (HF models load once)."""
    key = (backend, model, base_url, api_key_env, k, temperature, max_tokens, timeout_s)
    with _JUDGES_LOCK:
        if key not in _JUDGES:
            if backend == "openai":
                impl = OpenAIJudge(base_url, model, api_key_env=api_key_env, max_tokens=max_tokens,
                                   temperature=temperature, timeout_s=timeout_s)
            elif backend == "hf":
                if not model:
                    raise ValueError("judge backend 'hf' needs model= (a hub id or a local folder)")
                impl = HFJudge.from_pretrained(model, max_new_tokens=max_tokens, temperature=temperature)
            else:
                raise ValueError(f"judge backend must be 'openai' or 'hf', got {backend!r}")
            _JUDGES[key] = Judge(impl, k=k)
        return _JUDGES[key]


def judge_stats() -> dict[str, int]:
    """Counters summed over every judge the registered rewards created (for the metrics log)."""
    total: Counter = Counter()
    with _JUDGES_LOCK:
        judges = list(_JUDGES.values())
    for judge in judges:
        total.update(judge.stats.as_dict())
    return dict(total)


_BACKEND_DOC = (" Backend: ``backend`` 'openai' (``base_url``, ``model``, key from env ``api_key_env``) or 'hf' "
                "(``model`` = hub id or folder); ``k`` samples, majority; failures give None and are counted "
                "in :func:`judge_stats`.")


def judge_answer(prompt: str, completion: str, row: dict, *, backend: str = "openai", model: str = "",
                 base_url: str = "http://127.0.0.1:8000", api_key_env: str | None = "OPENAI_API_KEY", k: int = 1,
                 temperature: float = 0.0, max_tokens: int = 64, timeout_s: float = 60.0,
                 rule_reward: str | None = "math_verify", max_answer_chars: int = 200,
                 swap_check: bool = False) -> float | None:
    """C2 hybrid verifier: rule reward first, then an LLM judge on the extracted final answer only."""
    judge = cached_judge(backend, model, base_url, api_key_env, k, temperature, max_tokens, timeout_s)
    return AnswerJudge(judge, rule_reward=rule_reward, max_answer_chars=max_answer_chars,
                       swap_check=swap_check)(prompt, completion, row)


def judge_rubric(prompt: str, completion: str, row: dict, *, backend: str = "openai", model: str = "",
                 base_url: str = "http://127.0.0.1:8000", api_key_env: str | None = "OPENAI_API_KEY", k: int = 1,
                 temperature: float = 0.0, max_tokens: int = 256, timeout_s: float = 60.0,
                 rubric_key: str = "rubric", require_evidence: bool = True) -> float | None:
    """C3 rubric reward over ``row[rubric_key]``: Σ w·s / Σ positive w in [−1, 1], evidence required."""
    if rubric_key not in row:
        raise KeyError(f"judge_rubric needs a {rubric_key!r} column (list of criteria) in the task row")
    judge = cached_judge(backend, model, base_url, api_key_env, k, temperature, max_tokens, timeout_s)
    return RubricJudge(judge, require_evidence=require_evidence).score(prompt, completion, row[rubric_key])


def judge_pairwise(prompt: str, completion: str, row: dict, *, backend: str = "openai", model: str = "",
                   base_url: str = "http://127.0.0.1:8000", api_key_env: str | None = "OPENAI_API_KEY", k: int = 1,
                   temperature: float = 0.0, max_tokens: int = 32, timeout_s: float = 60.0,
                   rubric_key: str = "rubric", reference_key: str = "reference") -> float | None:
    """C4 RPO reward: 1 / 0 / 0.5 for a weighted win / loss / tie against ``row[reference_key]``."""
    for key in (rubric_key, reference_key):
        if key not in row:
            raise KeyError(f"judge_pairwise needs a {key!r} column in the task row")
    judge = cached_judge(backend, model, base_url, api_key_env, k, temperature, max_tokens, timeout_s)
    return PairwiseRubricJudge(judge).score(prompt, completion, str(row[reference_key]), row[rubric_key])


def judge_score(prompt: str, completion: str, row: dict, *, backend: str = "openai", model: str = "",
                base_url: str = "http://127.0.0.1:8000", api_key_env: str | None = "OPENAI_API_KEY", k: int = 1,
                temperature: float = 0.0, max_tokens: int = 32, timeout_s: float = 60.0, low: float = 1.0,
                high: float = 10.0, reference_key: str = "answer") -> float | None:
    """A judge rating on [low, high] normalised to [0, 1] (mean over the k samples)."""
    judge = cached_judge(backend, model, base_url, api_key_env, k, temperature, max_tokens, timeout_s)
    return ScoreJudge(judge, low=low, high=high).score(prompt, completion, str(row.get(reference_key, "")))


for _fn, _spec in ((judge_answer, "data_agents_eval.md C2"), (judge_rubric, "data_agents_eval.md C3"),
                   (judge_pairwise, "data_agents_eval.md C4"), (judge_score, "issue 4 §4 (scored judge)")):
    _fn.__doc__ += _BACKEND_DOC
    register("reward", _fn.__name__, spec=_spec)(_fn)
