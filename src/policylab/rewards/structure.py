"""Format and structure rewards (issue 4 part 3).

* ``think_answer_format``: the completion is ``<think>...</think><answer>...</answer>`` and nothing else.
* RL-Struct JSON rewards (advantages_rewards.md C7): ``json_valid``, ``json_schema_match``,
  ``json_type_match``, ``json_field_accuracy`` and their weighted sum ``rl_struct``.
* ``soft_length_penalty``: DAPO's soft overlong punishment (objectives.md §1.3) on the completion's
  text length, with an optional per-row budget (the token-level stage is ``soft_overlong``).
* ``ssl_tiers``: Sweet Spot Learning tiered rewards (advantages_rewards.md C1).
* ``otc`` (reward_shaping, group-relative): optimal tool-call reward (advantages_rewards.md C4,
  data_agents_eval.md D3).
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

import torch
from torch import Tensor

from policylab import registry
from policylab.registry import register
from policylab.fields import declare_field

# Written by a multi-turn (tool-using) rollout engine; without one, OTC counts tool-call tags in the text.
declare_field("tool_calls", per_row=True, shape="[B]", dtype="any", owner="multi-turn rollout engine",
              doc="number of tool calls the engine executed for each completion")
from policylab.rollouts import Rollouts


# --------------------------------------------------------------------------------------------------
# Tag format
# --------------------------------------------------------------------------------------------------
@register("reward", "think_answer_format", spec="issue 4 §3 (R1-style tag format)")
def think_answer_format(prompt: str, completion: str, row: dict, *, think_tag: str = "think",
                        answer_tag: str = "answer", think_opened_in_prompt: bool = False,
                        partial_credit: bool = False) -> float:
    """1.0 if the completion is exactly one ``<think>..</think>`` block followed by one
    ``<answer>..</answer>`` block (whitespace around them allowed, non-empty answer), else 0.0.

    ``think_opened_in_prompt``: the chat template already wrote ``<think>`` (the completion starts
    inside it). ``partial_credit``: instead of 0, the fraction of five checks that hold (each of the
    four tags appears exactly once; the blocks are in order with nothing outside them).
    """
    text = f"<{think_tag}>" + completion if think_opened_in_prompt else completion
    tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
    t_open, t_close, a_open, a_close = (re.escape(t) for t in tags)
    inner_think = rf"(?:(?!{t_open}|{t_close}).)*"
    inner_answer = rf"(?:(?!{a_open}|{a_close}).)*\S(?:(?!{a_open}|{a_close}).)*"
    strict = re.fullmatch(rf"\s*{t_open}{inner_think}{t_close}\s*{a_open}{inner_answer}{a_close}\s*", text, re.DOTALL)
    if strict:
        return 1.0
    if not partial_credit:
        return 0.0
    checks = [text.count(tag) == 1 for tag in tags]
    return sum(checks) / (len(checks) + 1)  # the fifth check (order, nothing outside) failed


# --------------------------------------------------------------------------------------------------
# JSON (RL-Struct, C7)
# --------------------------------------------------------------------------------------------------
_JSON_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_TYPE_CHECKS = {
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
    "any": lambda v: True,
}
_TYPE_ALIASES = {"array": "list", "dict": "object", "str": "string", "int": "integer", "float": "number",
                 "bool": "boolean", "none": "null"}


def extract_json(text: str) -> tuple[bool, Any]:
    """(True, value) for the JSON in a completion: the whole text, else the last fenced block, else
    the first parseable object/array starting at a ``{`` or ``[``; (False, None) if there is none."""
    candidates = [text.strip()] + [b.strip() for b in reversed(_JSON_FENCE.findall(text))]
    for candidate in candidates:
        try:
            return True, json.loads(candidate)
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\[{]", text)][:200]
    for start in starts:
        try:
            return True, decoder.raw_decode(text, start)[0]
        except ValueError:
            continue
    return False, None


def schema_types(schema) -> dict[str, str]:
    """Key path -> type name. Accepts ``{"answer": "number", "meta": {"author": "string"},
    "steps": [{"text": "string"}]}`` or a JSON Schema object (``type``/``properties``/``items``).
    Nested keys are joined with ``.``; keys inside list items get ``[]`` (``steps[].text``)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise ValueError(f"schema is a string that is not JSON: {schema[:80]!r}") from err
    if isinstance(schema, dict) and schema.get("type") == "object" and isinstance(schema.get("properties"), dict):
        schema = _from_json_schema(schema)
    if not isinstance(schema, dict) or not schema:
        raise ValueError(f"schema must be a non-empty dict of key -> type, got {schema!r:.80}")
    out: dict[str, str] = {}
    _walk_schema(schema, "", out)
    return out


def _from_json_schema(node):
    kind = node.get("type", "any")
    if kind == "object" and isinstance(node.get("properties"), dict):
        return {key: _from_json_schema(sub) for key, sub in node["properties"].items()}
    if kind == "array" and isinstance(node.get("items"), dict) and node["items"].get("type") == "object":
        return [_from_json_schema(node["items"])]
    return kind if isinstance(kind, str) else "any"


def _walk_schema(node: dict, prefix: str, out: dict) -> None:
    for key, sub in node.items():
        path = f"{prefix}{key}"
        if isinstance(sub, dict):
            out[path] = "object"
            _walk_schema(sub, path + ".", out)
        elif isinstance(sub, list):
            out[path] = "list"
            if sub and isinstance(sub[0], dict):
                _walk_schema(sub[0], path + "[].", out)
        else:
            name = _TYPE_ALIASES.get(str(sub).lower(), str(sub).lower())
            if name not in _TYPE_CHECKS:
                raise ValueError(f"schema type {sub!r} at {path!r} is not one of {sorted(_TYPE_CHECKS)}")
            out[path] = name


def key_paths(value, prefix: str = "") -> dict[str, list]:
    """Key path -> values found there (lists of objects contribute ``path[].key``)."""
    out: dict[str, list] = {}
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}{key}"
            out.setdefault(path, []).append(sub)
            for inner, found in key_paths(sub, path + ".").items():
                out.setdefault(inner, []).extend(found)
    elif isinstance(value, list) and prefix:
        for item in value:
            if isinstance(item, dict):
                for inner, found in key_paths(item, prefix[:-1] + "[].").items():
                    out.setdefault(inner, []).extend(found)
    return out


def _normalise(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return " ".join(text.casefold().split())


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().replace(",", ""))
        except ValueError:
            return None
    return None


def token_f1(predicted: list[str], gold: list[str]) -> float:
    """F1 of two token multisets (1.0 when both are empty)."""
    if not predicted and not gold:
        return 1.0
    remaining = list(gold)
    overlap = 0
    for token in predicted:
        if token in remaining:
            remaining.remove(token)
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def field_score(predicted, gold) -> float:
    """C7 content metric for one field: token-F1 for lists and multi-word text, numeric match for
    numbers (``"5"`` matches 5), normalised exact match otherwise."""
    if isinstance(gold, list):
        return token_f1([_normalise(v) for v in predicted], [_normalise(v) for v in gold]) \
            if isinstance(predicted, list) else 0.0
    gold_number, predicted_number = _as_number(gold), _as_number(predicted)
    if gold_number is not None and predicted_number is not None:
        return float(abs(gold_number - predicted_number) <= 1e-6 * max(1.0, abs(gold_number)))
    if isinstance(gold, str) and len(gold.split()) > 1:
        return token_f1(_normalise(predicted).split(), _normalise(gold).split())
    return float(_normalise(predicted) == _normalise(gold))


def _gold_leaves(gold, prefix: str = "") -> dict[str, Any]:
    if isinstance(gold, dict):
        out = {}
        for key, sub in gold.items():
            out.update(_gold_leaves(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: gold}


def rl_struct_components(completion: str, schema, gold: dict | None, *, format_over: str = "schema") -> dict[str, float]:
    """The four C7 terms for one completion.

    R_valid: the extracted JSON parses (if not, every term is 0). R_struct: Jaccard of predicted and
    schema key paths. R_format: schema keys present with the schema's type, over all schema keys
    (``format_over="schema"``, ours: missing keys count against it) or over the present ones
    (``"present"``). R_content: mean ``field_score`` over the gold leaves (1.0 when gold is empty).
    """
    if format_over not in ("schema", "present"):
        raise ValueError(f"format_over must be 'schema' or 'present', got {format_over!r}")
    types = schema_types(schema)
    ok, value = extract_json(completion)
    if not ok:
        return {"valid": 0.0, "struct": 0.0, "format": 0.0, "content": 0.0}
    found = key_paths(value)
    predicted, expected = set(found), set(types)
    struct = len(predicted & expected) / len(predicted | expected) if predicted | expected else 1.0
    matching = sum(all(_TYPE_CHECKS[types[p]](v) for v in found[p]) for p in expected & predicted)
    denominator = len(expected) if format_over == "schema" else len(expected & predicted)
    type_match = matching / denominator if denominator else 0.0
    leaves = _gold_leaves(gold) if gold else {}
    if leaves:
        scores = [field_score(found[p][0], g) if p in found else 0.0 for p, g in leaves.items()]
        content = sum(scores) / len(scores)
    else:
        content = 1.0
    return {"valid": 1.0, "struct": struct, "format": type_match, "content": content}


def _row_schema_and_gold(row: dict, schema_key: str, gold_key: str, answer_field: str, need_gold: bool):
    if schema_key not in row:
        raise KeyError(f"JSON rewards need a {schema_key!r} column (key -> type) in the task row")
    gold = row.get(gold_key)
    if gold is None:
        if need_gold:
            raise KeyError(f"JSON content reward needs a {gold_key!r} column (gold values) in the task row")
        return row[schema_key], None
    if isinstance(gold, str):
        try:
            parsed = json.loads(gold)
        except ValueError:
            parsed = gold
        gold = parsed
    if not isinstance(gold, dict):
        gold = {answer_field: gold}
    return row[schema_key], gold


def _json_term(term: str, need_gold: bool, name: str, doc: str):
    def reward(prompt: str, completion: str, row: dict, *, schema_key: str = "schema", gold_key: str = "answer",
               answer_field: str = "answer", format_over: str = "schema") -> float:
        schema, gold = _row_schema_and_gold(row, schema_key, gold_key, answer_field, need_gold)
        return rl_struct_components(completion, schema, gold, format_over=format_over)[term]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = doc + " Row: ``schema`` (and ``answer`` gold values); see :func:`rl_struct`."
    return register("reward", name, spec=f"advantages_rewards.md C7 (R_{term})")(reward)


json_valid = _json_term("valid", False, "json_valid", "C7 R_valid: 1.0 if the completion's JSON parses, else 0.0.")
json_schema_match = _json_term("struct", False, "json_schema_match",
                               "C7 R_struct: Jaccard of predicted and schema key paths (0 if no JSON).")
json_type_match = _json_term("format", False, "json_type_match",
                             "C7 R_format: fraction of schema keys present with the schema's value type.")
json_field_accuracy = _json_term("content", True, "json_field_accuracy",
                                 "C7 R_content: mean per-field match against the gold values.")


@register("reward", "rl_struct", spec="advantages_rewards.md C7")
def rl_struct(prompt: str, completion: str, row: dict, *, w_valid: float = 0.25, w_struct: float = 0.25,
              w_format: float = 0.25, w_content: float = 0.25, schema_key: str = "schema", gold_key: str = "answer",
              answer_field: str = "answer", format_over: str = "schema") -> float:
    """R = w_v·R_valid + w_s·R_struct + w_f·R_format + w_c·R_content (C7; equal weights 0.25 are ours).

    Row: ``schema`` (key -> type, or a JSON Schema) and ``answer`` (gold values: a dict, JSON text, or
    a scalar standing for ``{answer_field: scalar}``). Without gold, R_content is left out (weight 0).
    """
    schema, gold = _row_schema_and_gold(row, schema_key, gold_key, answer_field, need_gold=False)
    terms = rl_struct_components(completion, schema, gold, format_over=format_over)
    content_weight = w_content if gold is not None else 0.0
    return (w_valid * terms["valid"] + w_struct * terms["struct"] + w_format * terms["format"]
            + content_weight * terms["content"])


# --------------------------------------------------------------------------------------------------
# Soft length penalty (objectives.md §1.3 on text length)
# --------------------------------------------------------------------------------------------------
def soft_length_penalty_value(length: float, max_len: float, cache_len: float, penalty_factor: float = 1.0) -> float:
    """R_len = min(−(|y| − (L_max − L_cache)) / L_cache · factor, 0), floored at −factor (a text can
    run past L_max; generated tokens cannot)."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    value = min(-(length - (max_len - cache_len)) / cache_len * penalty_factor, 0.0)
    return max(value, -penalty_factor)


@register("reward", "soft_length_penalty", spec="objectives.md §1.3 (soft overlong punishment)")
def soft_length_penalty(prompt: str, completion: str, row: dict, *, max_len: float | None = None,
                        cache_len: float | None = None, buffer_fraction: float = 0.2, penalty_factor: float = 1.0,
                        unit: str = "words", budget_key: str = "max_length") -> float:
    """DAPO's soft overlong punishment on the completion's length in ``unit`` ("words" or "chars"):
    0 up to L_max − L_cache, linear to −factor at L_max. ``row[budget_key]`` (when present) sets a
    per-prompt L_max; ``cache_len`` defaults to ``buffer_fraction · L_max``."""
    if unit not in ("words", "chars"):
        raise ValueError(f"unit must be 'words' or 'chars', got {unit!r}")
    limit = row.get(budget_key, max_len)
    if limit is None:
        raise ValueError(f"soft_length_penalty needs max_len or a {budget_key!r} column in the task row")
    limit = float(limit)
    cache = float(cache_len) if cache_len is not None else max(1.0, buffer_fraction * limit)
    length = len(completion.split()) if unit == "words" else len(completion)
    return soft_length_penalty_value(length, limit, min(cache, limit), penalty_factor)


# --------------------------------------------------------------------------------------------------
# SSL tiered rewards (C1)
# --------------------------------------------------------------------------------------------------
def ssl_tier(quality: float, thresholds: tuple[float, ...]) -> int:
    """k(q) = #{j : q ≥ τ_j}."""
    return sum(quality >= t for t in thresholds)


def ssl_reward(success: float, quality: float, thresholds=(0.25, 0.5, 0.75, 0.9), bonus_scale: float = 0.5) -> float:
    """C1: r = s + λ·(2^k − 1)/(2^K − 1). With λ < 1 every success outranks every failure."""
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"thresholds must be a non-empty increasing sequence, got {thresholds}")
    if not 0 <= bonus_scale < 1:
        raise ValueError(f"bonus_scale (λ) must be in [0, 1) so successes stay above failures, got {bonus_scale}")
    tier = ssl_tier(quality, thresholds)
    return success + bonus_scale * (2 ** tier - 1) / (2 ** len(thresholds) - 1)


@functools.lru_cache(maxsize=32)
def _named_reward(name: str):
    return registry.build("reward", name)


def milestone_fraction(completion: str, milestones) -> float:
    """Fraction of reference milestones (strings) found in the completion, case/space-normalised."""
    if not isinstance(milestones, (list, tuple)) or not milestones:
        raise ValueError(f"milestones must be a non-empty list of strings, got {milestones!r:.80}")
    text = " ".join(completion.casefold().split())
    return sum(" ".join(str(m).casefold().split()) in text for m in milestones) / len(milestones)


@register("reward", "ssl_tiers", spec="advantages_rewards.md C1")
def ssl_tiers(prompt: str, completion: str, row: dict, *, success_reward: str = "math_verify",
              success_threshold: float = 0.5, quality_reward: str | None = None, milestones_key: str = "milestones",
              thresholds: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9), bonus_scale: float = 0.5) -> float | None:
    """Sweet Spot Learning: success s from the reward named ``success_reward`` (s = 1 when it is ≥
    ``success_threshold``), quality q from the reward named ``quality_reward`` or, by default, the
    fraction of ``row[milestones_key]`` found in the completion; r = s + λ·(2^k − 1)/(2^K − 1).
    Reconstructed in the spec: τ=(0.25, 0.5, 0.75, 0.9), λ=0.5 are its defaults."""
    score = _named_reward(success_reward)(prompt, completion, row)
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return None
    if quality_reward is not None:
        quality = _named_reward(quality_reward)(prompt, completion, row)
        if quality is None:
            return None
    elif milestones_key in row:
        quality = milestone_fraction(completion, row[milestones_key])
    else:
        raise KeyError(f"ssl_tiers needs quality_reward= or a {milestones_key!r} column in the task row")
    success = 1.0 if float(score) >= success_threshold else 0.0
    return ssl_reward(success, min(max(float(quality), 0.0), 1.0), tuple(thresholds), bonus_scale)


# --------------------------------------------------------------------------------------------------
# OTC optimal tool calls (C4 / D3), group-relative
# --------------------------------------------------------------------------------------------------
def otc_tool_reward(calls: float, optimal: float | None, c: float = 2.0) -> float:
    """r_tool(m, n). OTC-PPO (``optimal`` None or 0): cos(m·π/(2m + c)), 1 at m = 0. OTC-GRPO:
    f = 2nm/(m + n), r_tool = sin(f·π/(2n)), peaking at m = n."""
    m = float(calls)
    if optimal is None or optimal == 0:
        return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))
    n = float(optimal)
    f = 2 * n * m / (m + n)
    return math.sin(f * math.pi / (2 * n))


def count_tool_calls(rollouts: Rollouts, pattern: str) -> Tensor:
    """[B] tool calls: the rollout engine's ``extras['tool_calls']`` if present, else occurrences of
    ``pattern`` in the completion text (D0 default format ``<tool_call>``)."""
    if "tool_calls" in rollouts.extras:
        return torch.as_tensor(rollouts.extras["tool_calls"], dtype=torch.float32).reshape(-1)
    if len(rollouts.completions) != rollouts.batch_size:
        raise ValueError("otc needs rollouts.extras['tool_calls'] or the completion texts")
    regex = re.compile(pattern)
    return torch.tensor([len(regex.findall(text)) for text in rollouts.completions], dtype=torch.float32)


@register("reward_shaping", "otc", spec="advantages_rewards.md C4; data_agents_eval.md D3")
class OptimalToolCalls:
    """OTC: r = α·r_tool(m, n)·r_φ, so wrong answers get 0 whatever their calls and right ones get
    most at the fewest calls known to suffice.

    ``variant="grpo"``: n = fewest calls among correct rollouts of the question, over the current
    group and (``history=True``, C4) every earlier step; kept in ``state_dict``. No correct rollout
    yet: n = 0, the OTC-PPO form (D3). ``variant="ppo"``: r_tool = cos(m·π/(2m + c)) always.
    r_φ = 1[reward ≥ ``correct_threshold``]. ``mode="replace"`` returns r − reward (the task reward
    becomes r, as in the paper); ``"bonus"`` adds r. c defaults to 2 (C4; D3 says 1).
    Questions are told apart by ``row[question_key]``, else by the prompt text.
    """

    def __init__(self, *, variant: str = "grpo", c: float = 2.0, alpha: float = 1.0, correct_threshold: float = 0.5,
                 history: bool = True, mode: str = "replace", question_key: str | None = None,
                 tool_pattern: str = r"<tool_call>"):
        if variant not in ("grpo", "ppo"):
            raise ValueError(f"otc variant must be 'grpo' or 'ppo', got {variant!r}")
        if mode not in ("replace", "bonus"):
            raise ValueError(f"otc mode must be 'replace' or 'bonus', got {mode!r}")
        self.variant, self.c, self.alpha, self.threshold = variant, float(c), float(alpha), float(correct_threshold)
        self.history, self.mode, self.question_key, self.tool_pattern = history, mode, question_key, tool_pattern
        self.best_calls: dict[str, float] = {}

    def _question(self, rollouts: Rollouts, i: int) -> str:
        if self.question_key is not None:
            return str(rollouts.rows[i][self.question_key])
        if len(rollouts.prompts) == rollouts.batch_size:
            return rollouts.prompts[i]
        return f"group:{int(rollouts.group[i])}"

    def __call__(self, rollouts: Rollouts) -> tuple[Tensor, dict]:
        if rollouts.rewards is None:
            raise ValueError("otc runs after the rewards: rollouts.rewards is None")
        rewards = rollouts.rewards.float()
        calls = count_tool_calls(rollouts, self.tool_pattern)
        correct = (rewards >= self.threshold) & ~torch.isnan(rewards)
        questions = [self._question(rollouts, i) for i in range(rollouts.batch_size)]
        optimal: dict[str, float] = dict(self.best_calls) if self.history else {}
        for q, m, ok in zip(questions, calls.tolist(), correct.tolist()):
            if ok:
                optimal[q] = min(optimal.get(q, math.inf), m)
        shaped = torch.zeros_like(rewards)
        for i, (q, m, ok) in enumerate(zip(questions, calls.tolist(), correct.tolist())):
            n = optimal.get(q) if self.variant == "grpo" else None
            shaped[i] = self.alpha * otc_tool_reward(m, n, self.c) if ok else 0.0
        if self.history:
            self.best_calls = optimal
        delta = shaped - rewards if self.mode == "replace" else shaped
        delta = torch.where(torch.isnan(rewards), torch.zeros_like(delta), delta)
        total_calls = float(calls.sum())
        metrics = {"otc/tool_calls_mean": float(calls.mean()), "otc/accuracy": float(correct.float().mean()),
                   "otc/tool_productivity": float(correct.sum()) / total_calls if total_calls else 0.0}
        return delta, metrics

    def state_dict(self) -> dict:
        return {"best_calls": dict(self.best_calls)}

    def load_state_dict(self, state: dict) -> None:
        self.best_calls = dict(state["best_calls"])
