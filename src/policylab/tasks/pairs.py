"""Offline preference pairs (DPO arXiv:2305.18290, KTO arXiv:2402.01306 on pair data): a jsonl loader, a
synthetic arithmetic pair task, and the batch transform that turns pair rows into Rollouts (chosen and
rejected as two rows of one prompt group).

How an offline-pair recipe runs in the loop (no loop change needed):
1. the task (``pairs`` or ``arithmetic_pairs``) yields rows ``{prompt, chosen, rejected, [answer], [system]}``;
2. the rollout engine generates as usual (the recipes ask for group_size 1 and few tokens: that output is
   discarded) and the rewards score it (they must not all fail: give the rows an ``answer``, or use a reward
   that tolerates rows without one);
3. the preference objectives (dpo, kto, copg, trpa) require the field ``pref_label``, so the loader adds the
   ``offline_pairs`` batch transform, which calls :func:`pair_rollouts`: each group becomes two rows, chosen then
   rejected, with ``pref_label`` = +1 / -1, rewards 1 / 0 and no behaviour log-probs; a batch of generated
   (online) rows passes unchanged with ``pref_label`` = 0. The reference scorer then fills ``ref_logp`` for the
   rows the objective trains on.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from policylab.fields import declare_field, lookup
from policylab.registry import register
from policylab.rollouts import Rollouts
from policylab.tasks import Task
from policylab.tasks.arithmetic import make_problem
from policylab.tasks.files import DatasetError, read_jsonl, split_rows

PAIR_COLUMNS = ("chosen", "rejected")

PREF_LABEL = declare_field("pref_label", per_row=True, shape="[B]", dtype="long", owner="batch transform 'offline_pairs'",
                           doc="+1 = chosen, -1 = rejected row of an offline preference pair; 0 = no offline label "
                               "(generated rows: preference objectives take pairs/labels from the rewards)")


def check_pair_row(row: dict, where: str) -> dict:
    for column in ("prompt", *PAIR_COLUMNS):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DatasetError(f"{where}: missing or empty {column!r} (a pair row needs prompt, chosen and rejected strings)")
    if row["chosen"] == row["rejected"]:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' are identical")
    if row.get("answer") is not None:
        row["answer"] = str(row["answer"])
    return row


def read_pair_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"pair dataset {path}: unsupported extension {path.suffix!r} (use .jsonl)")
    rows = read_jsonl(path, require_answer=False)
    if not rows:
        raise DatasetError(f"pair dataset {path} has no rows")
    return [check_pair_row(r, f"{path}:{i + 1}") for i, r in enumerate(rows)]


@register("task", "pairs", spec="arXiv:2305.18290 (offline preference pairs for DPO)")
def pairs_task(*, path: str, eval_path: str | None = None, eval_fraction: float = 0.1, seed: int = 0) -> Task:
    """Preference pairs from a jsonl file with ``prompt``, ``chosen``, ``rejected`` (optional ``answer``, ``system``)."""
    rows = read_pair_rows(path)
    if eval_path:
        train, evaluation = rows, read_pair_rows(eval_path)
    else:
        train, evaluation = split_rows(rows, eval_fraction, seed)
    return Task(Path(path).stem, train=train, eval=evaluation)


@register("task", "arithmetic_pairs", spec="arXiv:2305.18290 (synthetic offline preference pairs)")
def arithmetic_pairs_task(*, train_size: int = 500, eval_size: int = 100, operators: str = "+", low: int = 10,
                          high: int = 99, max_error: int = 10,
                          template: str = "What is {expr}? Give only the final number.", seed: int = 1234) -> Task:
    """Arithmetic prompts with chosen = the correct number and rejected = a number off by 1..max_error.

    Rows keep ``answer``, so the usual ``numeric_answer`` reward and the eval work unchanged.
    """
    if max_error < 1:
        raise ValueError("arithmetic_pairs: max_error must be >= 1")
    rng = random.Random(seed)
    rows, seen = [], set()
    budget = 50 * (train_size + eval_size) + 1000
    while len(rows) < train_size + eval_size and budget:
        budget -= 1
        expr, value = make_problem(rng, 2, operators, low, high)
        if expr in seen:
            continue
        seen.add(expr)
        wrong = value + rng.choice([-1, 1]) * rng.randint(1, max_error)
        rows.append({"prompt": template.format(expr=expr), "answer": str(value), "chosen": str(value),
                     "rejected": str(wrong), "expression": expr})
    if len(rows) < train_size + eval_size:
        raise ValueError(f"arithmetic_pairs: only {len(rows)} distinct problems exist; lower train_size/eval_size")
    return Task("arithmetic_pairs", train=rows[:train_size], eval=rows[train_size:])


def has_pair_rows(rows: list[dict[str, Any]]) -> bool:
    """True when every row carries chosen/rejected texts (an offline pair batch)."""
    return bool(rows) and all(isinstance(r, dict) and all(isinstance(r.get(c), str) for c in PAIR_COLUMNS) for r in rows)


def pair_rollouts(rollouts: Rollouts, tokenizer, *, append_eos: bool = True) -> Rollouts:
    """Replace each prompt group by two rows, chosen then rejected, of that group's pair row.

    Prompt tokens are the group's own (as the engine formatted them); completions are tokenised without special
    tokens, plus EOS when ``append_eos`` (generated completions end with EOS too). Returns rows with
    extras["pref_label"] = [+1, -1, ...], rewards [1, 0, ...] and group ids 0..P-1.
    """
    if not has_pair_rows(rollouts.rows):
        raise ValueError("pair_rollouts: every row needs 'chosen' and 'rejected' strings")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    firsts = [int((rollouts.group == g).nonzero()[0]) for g in torch.unique(rollouts.group)]
    prompts, prompt_rows, completions, ids, rows, labels = [], [], [], [], [], []
    for i in firsts:
        row = rollouts.rows[i]
        prompt = rollouts.prompt_ids[i][rollouts.prompt_mask[i] > 0]
        for text, label in ((row["chosen"], 1), (row["rejected"], -1)):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if append_eos and eos is not None:
                tokens = list(tokens) + [eos]
            if not tokens:
                raise ValueError(f"pair_rollouts: the {'chosen' if label > 0 else 'rejected'} text of prompt "
                                 f"{row['prompt'][:40]!r} tokenises to nothing")
            prompt_rows.append(prompt)
            ids.append(torch.tensor(tokens, dtype=torch.long))
            prompts.append(rollouts.prompts[i] if rollouts.prompts else row["prompt"])
            completions.append(text)
            rows.append(row)
            labels.append(label)
    b = len(ids)
    p_len, t_len = max(len(p) for p in prompt_rows), max(len(t) for t in ids)
    prompt_ids = torch.full((b, p_len), pad, dtype=torch.long)
    prompt_mask = torch.zeros(b, p_len)
    completion_ids = torch.full((b, t_len), pad, dtype=torch.long)
    completion_mask = torch.zeros(b, t_len)
    for k, (p, t) in enumerate(zip(prompt_rows, ids)):
        prompt_ids[k, p_len - len(p):], prompt_mask[k, p_len - len(p):] = p, 1.0
        completion_ids[k, :len(t)], completion_mask[k, :len(t)] = t, 1.0
    label = torch.tensor(labels, dtype=torch.long)
    rewards = (label > 0).float()
    extras = {k: v for k, v in rollouts.extras.items() if not lookup(k).per_row}  # per-batch fields carry over
    extras["pref_label"] = label
    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
        group=torch.arange(b) // 2, truncated=torch.zeros(b, dtype=torch.bool), prompts=prompts, completions=completions,
        rows=rows, rewards=rewards, reward_components={"accuracy": rewards.clone()}, extras=extras,
    )


class OfflinePairs:
    """Offline preference pairs as training rows (the data side of DPO, arXiv:2305.18290, and KTO on pair data).

    ``transform``: a batch whose rows all carry ``chosen``/``rejected`` texts is replaced by two rows per prompt
    (:func:`pair_rollouts`: chosen then rejected, ``pref_label`` +1 / -1, rewards 1 / 0); any other batch passes
    unchanged with ``pref_label`` = 0. It adds and drops rows, so it is a batch transform. Registered also as an
    annotator with ``auto_provider`` so that the loader adds it whenever a component requires ``pref_label``
    (train/stages.py looks auto providers up among annotators); a recipe may list it under
    ``algorithm.batch_transforms`` instead.
    """

    provides = (PREF_LABEL,)
    auto_provider = True

    def transform(self, rollouts: Rollouts, ctx) -> Rollouts:
        if has_pair_rows(rollouts.rows):
            return pair_rollouts(rollouts, ctx.tokenizer)
        return rollouts.with_(extras={**rollouts.extras, "pref_label": torch.zeros(rollouts.batch_size, dtype=torch.long)})


register("batch_transform", "offline_pairs", spec="arXiv:2305.18290 (offline preference pairs)")(OfflinePairs)
register("annotator", "offline_pairs", spec="arXiv:2305.18290 (offline preference pairs)")(OfflinePairs)
