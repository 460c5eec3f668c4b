"""Tasks from files: jsonl and parquet with columns prompt (a string, or TRL's conversational list of
{role, content} messages), answer, optional system (+ extras). Errors name the file and line.
Hugging Face datasets (saved folders, data folders, hub ids): tasks/hf_datasets.py."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from policylab.registry import register
from policylab.tasks import Task


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and line/row."""


def check_messages(messages: Any, where: str, column: str = "prompt") -> None:
    """A conversational prompt (TRL's format): a non-empty list of {"role": str, "content": str} dicts."""
    if not messages:
        raise DatasetError(f"{where}: column {column!r} is an empty message list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: column {column!r} message {j} must be {{'role': str, 'content': str}}, "
                               f"got {m!r:.80}")


def _check_row(row: Any, where: str, require_answer: bool) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
    prompt = row.get("prompt")
    if isinstance(prompt, (list, tuple)):
        check_messages(prompt, where)
        row["prompt"] = [dict(m) for m in prompt]
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: missing or empty 'prompt' (a string or a list of {{role, content}} messages)")
    if require_answer and row.get("answer") is None:
        raise DatasetError(f"{where}: missing 'answer'")
    if "system" in row and row["system"] is not None and not isinstance(row["system"], str):
        raise DatasetError(f"{where}: 'system' must be a string")
    return row


def read_jsonl(path: Path, require_answer: bool = True) -> list[dict]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"dataset file {path} cannot be read: {err}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        rows.append(_check_row(row, f"{path}:{lineno}", require_answer))
    return rows


def read_parquet(path: Path, require_answer: bool = True) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is a core dependency
        raise DatasetError("reading parquet needs pyarrow") from err
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"dataset file {path} is not readable parquet: {err}") from None
    return [_check_row(r, f"{path} row {i}", require_answer) for i, r in enumerate(table.to_pylist())]


def read_rows(path: str | Path, require_answer: bool = True) -> list[dict]:
    path = Path(path)
    if path.suffix == ".jsonl" or path.suffix == ".json":
        rows = read_jsonl(path, require_answer)
    elif path.suffix == ".parquet":
        rows = read_parquet(path, require_answer)
    else:
        raise DatasetError(f"dataset file {path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")
    if not rows:
        raise DatasetError(f"dataset file {path} has no rows")
    for r in rows:
        r["answer"] = None if r.get("answer") is None else str(r["answer"])
    return rows


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(rows) * eval_fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


@register("task", "file", spec="foundation issue §4")
def file_task(*, path: str, eval_path: str | None = None, eval_fraction: float = 0.1, seed: int = 0) -> Task:
    """Rows from a .jsonl or .parquet file; eval split from ``eval_path`` or a seeded held-out fraction."""
    rows = read_rows(path)
    if eval_path:
        train, evaluation = rows, read_rows(eval_path)
    else:
        train, evaluation = split_rows(rows, eval_fraction, seed)
    return Task(Path(path).stem, train=train, eval=evaluation)
