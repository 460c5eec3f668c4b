"""Prompts longer than the model's context budget, handled before any generation by a declared policy
(``rollout.overlong_prompt``): ``error`` (the default: fail naming the rows), ``truncate_left`` (keep the end of
the prompt, where the question usually is) or ``drop`` (leave the row out). The budget is the model's
``max_position_embeddings`` minus the completion's ``max_new_tokens``; without the check a prompt past the context
reaches generation and fails there (position embeddings out of range, or an allocation the size of the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from policylab.rollout.hf import format_request
from policylab.train.errors import TrainingError

POLICIES = ("error", "truncate_left", "drop")


@dataclass
class BudgetReport:
    split: str
    total: int
    overlong: int
    budget: int
    policy: str

    def line(self) -> str:
        done = {"truncate_left": "truncated from the left", "drop": "dropped"}[self.policy]
        return (f"rollout.overlong_prompt={self.policy}: {done} {self.overlong} of {self.total} {self.split} prompts "
                f"longer than the {self.budget}-token prompt budget")


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """Tokens a prompt may have so that prompt + completion fit the context; None when the model does not say."""
    context = context_length(model)
    if context is None:
        return None
    budget = int(context) - int(max_new_tokens)
    if budget <= 0:
        raise TrainingError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                            f"{context}-token context (max_position_embeddings); lower rollout.max_new_tokens")
    return budget


def prompt_tokens(tokenizer, row: dict) -> int:
    return len(tokenizer(format_request(tokenizer, row), add_special_tokens=False).input_ids)


def apply_policy(rows: list[dict], tokenizer, budget: int, policy: str, split: str,
                 warn: Callable[[str], None]) -> list[dict]:
    """``rows`` with the policy applied (new dicts for truncated rows); an ``error`` policy raises naming the rows."""
    if policy not in POLICIES:
        raise TrainingError(f"rollout.overlong_prompt={policy!r}: expected one of {list(POLICIES)}")
    out, overlong = [], []
    for i, row in enumerate(rows):
        # a token is at least one byte (byte-level BPE, byte fallback), so a short text needs no tokenizing
        if len(format_request(tokenizer, row).encode()) <= budget:
            out.append(row)
            continue
        n = prompt_tokens(tokenizer, row)
        if n <= budget:
            out.append(row)
            continue
        overlong.append((i, n))
        if policy == "truncate_left":
            out.append(truncate_left(row, tokenizer, budget))
    if overlong and policy == "error":
        shown = ", ".join(f"row {i} ({n} tokens, {_start(rows[i])})" for i, n in overlong[:5])
        raise TrainingError(
            f"{len(overlong)} of {len(rows)} {split} prompts are longer than the {budget}-token prompt budget (the "
            f"model's context minus max_new_tokens): {shown}{' ...' if len(overlong) > 5 else ''}; set "
            "rollout.overlong_prompt=truncate_left or =drop, or lower rollout.max_new_tokens")
    if overlong:
        warn(BudgetReport(split, len(rows), len(overlong), budget, policy).line())
    if not out:
        raise TrainingError(f"rollout.overlong_prompt=drop left no {split} prompt within the {budget}-token budget")
    return out


def _start(row: dict) -> str:
    prompt = row["prompt"]
    text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
    return repr(text[:30] + ("..." if len(text) > 30 else ""))


def truncate_left(row: dict, tokenizer, budget: int) -> dict:
    """The row with its prompt cut from the left until the formatted prompt fits ``budget`` tokens. A chat prompt
    loses its oldest non-system messages first, then the start of the oldest one left."""
    row = dict(row)
    if isinstance(row["prompt"], (list, tuple)):
        messages = [dict(m) for m in row["prompt"]]
        while prompt_tokens(tokenizer, {**row, "prompt": messages}) > budget:
            removable = [k for k, m in enumerate(messages) if m.get("role") != "system"]
            if len(removable) <= 1:
                break
            messages.pop(removable[0])
        row["prompt"] = messages
        first = next((k for k, m in enumerate(messages) if m.get("role") != "system"), None)
        if first is None:
            raise TrainingError("a prompt of only system messages is over the budget; it cannot be truncated")

        def with_text(text):
            copy = [dict(m) for m in messages]
            copy[first]["content"] = text
            return {**row, "prompt": copy}

        return _cut(tokenizer, budget, str(messages[first]["content"]), with_text)
    return _cut(tokenizer, budget, str(row["prompt"]), lambda text: {**row, "prompt": text})


def _cut(tokenizer, budget: int, text: str, make: Callable[[str], dict]) -> dict:
    excess = prompt_tokens(tokenizer, make(text)) - budget
    if excess <= 0:  # dropping older messages was enough
        return make(text)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = len(ids) - excess
    while keep > 0:
        candidate = make(tokenizer.decode(ids[len(ids) - keep:]))
        excess = prompt_tokens(tokenizer, candidate) - budget
        if excess <= 0:  # re-tokenizing decoded text can merge differently: check, and cut further if needed
            return candidate
        keep -= excess
    raise TrainingError(f"the prompt template alone is longer than the {budget}-token prompt budget "
                        f"(system message or chat template); lower rollout.max_new_tokens")
